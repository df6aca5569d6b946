"""The fused rotary forward (:mod:`vajra.gpu.fused_layers`): one gather from a table made at
install, equal to the rotary module's own cosines and sines.

In-process on the CPU with ``TRITON_INTERPRET`` set, which makes the fused forwards run on CPU
tensors; the gather itself is torch's, so no Triton kernel runs here. Checked: Llama's
default, ``linear`` and ``yarn`` frequencies (yarn scales the cosines and sines), Qwen2's and
Mistral's rotary modules, float32 and bfloat16, one and two rows of positions, the table's
rows (``max_positions``); the module's own forward with gradients on, for another dtype, and
for ``dynamic`` scaling, whose module is left alone. The CUDA test, marked ``gpu``, runs the
same on the device.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from vajra.gpu import fused_layers

SHAPE = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 4096}
SCALINGS: list[dict[str, Any] | None] = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
]


class Holder(torch.nn.Module):
    """The smallest model :func:`fused_layers.install` accepts: a config, a parameter (its
    dtype is the table's) and a rotary module."""

    def __init__(self, rotary: torch.nn.Module, config: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.rotary = rotary
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)


def modules() -> list[tuple[str, Any, Any]]:
    found: list[tuple[str, Any, Any]] = []
    for scaling in SCALINGS:
        config = LlamaConfig(**SHAPE)
        if scaling is not None:
            config.rope_parameters = {**config.rope_parameters, **scaling}
        found.append((f"llama {scaling}", LlamaRotaryEmbedding, config))
    found.append(("qwen2", Qwen2RotaryEmbedding, Qwen2Config(**SHAPE)))
    found.append(("mistral", MistralRotaryEmbedding, MistralConfig(**SHAPE)))
    return found


def rotary_table_check(device: str) -> None:
    for name, cls, config in modules():
        for dtype in (torch.float32, torch.bfloat16):
            rotary = cls(config).to(device)
            own = type(rotary).forward
            model = Holder(rotary, config, dtype).to(device)
            assert fused_layers.install(model, max_positions=300) == 1, name
            assert fused_layers.install(model, max_positions=300) == 0, name
            x = torch.zeros(2, 5, 64, dtype=dtype, device=device)
            gen = torch.Generator().manual_seed(1)
            for rows in (1, 2):
                positions = torch.randint(0, 300, (rows, 7), generator=gen).to(device)
                positions[0, 0] = 299  # the table's last row
                with torch.no_grad():
                    got = rotary(x, positions)
                    want = own(rotary, x, positions)
                for g, w in zip(got, want, strict=True):
                    assert g.shape == w.shape == (rows, 7, 16) and g.dtype == dtype, name
                    assert torch.equal(g, w), (name, dtype, (g - w).abs().max())
            with torch.no_grad():  # another dtype than the table's: the module's own forward
                other = torch.float16
                got = rotary(x.to(other), positions)
                assert all(t.dtype == other for t in got), name
            got = rotary(x, positions)  # gradients on: the module's own forward
            assert all(t.is_contiguous() for t in got), name


def test_the_table_gives_the_modules_own_cosines_and_sines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read at each call: fused forwards on the CPU
    rotary_table_check("cpu")


def test_frequencies_that_change_with_the_length_keep_their_own_forward() -> None:
    pytest.importorskip("triton")
    config = LlamaConfig(**SHAPE)
    config.rope_parameters = {**config.rope_parameters, "rope_type": "dynamic", "factor": 2.0}
    rotary = LlamaRotaryEmbedding(config)
    assert fused_layers.install(Holder(rotary, config, torch.float32)) == 0
    assert "forward" not in vars(rotary)


def test_without_max_positions_the_table_covers_the_models_positions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = LlamaConfig(**{**SHAPE, "max_position_embeddings": 40})
    rotary = LlamaRotaryEmbedding(config)
    assert fused_layers.install(Holder(rotary, config, torch.float32)) == 1
    with torch.no_grad():
        cos, _ = rotary(torch.zeros(1, 1, 64), torch.tensor([[39]]))
        with pytest.raises(IndexError):  # past the table: refused on the CPU, never read
            rotary(torch.zeros(1, 1, 64), torch.tensor([[40]]))
    assert torch.equal(
        cos, LlamaRotaryEmbedding.forward(rotary, torch.zeros(1), torch.tensor([[39]]))[0]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_table_on_the_gpu_gives_the_modules_own_cosines_and_sines() -> None:
    pytest.importorskip("triton")
    rotary_table_check("cuda")
