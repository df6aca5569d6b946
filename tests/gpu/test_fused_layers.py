"""The fused kernels (RMS norm, residual add with RMS norm, rotary embedding, MLP activation)
and the fused decoder-layer forwards against transformers' own modules.

Rules: the interpreter must be switched on before triton is first imported, so the kernels'
check runs in a fresh process (``TRITON_INTERPRET=1``, this module run with ``-m``) on CPU
tensors:

- transformers' ``LlamaRMSNorm`` and ``LlamaMLP`` with random weights, in float32 (1e-5),
  float16 and bfloat16 (within two units in the last place of the output: the sum of squares
  runs in another order and the exponential is another implementation, and one unit of the
  rounded intermediate, times the weight or ``up``, may reach two of the output); rows not a
  power of two wide, a strided input and no rows;
- the add-and-norm kernel: its sum equal to torch's add (one unit in bfloat16 in the
  interpreter, which truncates where torch rounds), its norm equal to the module's of that sum;
- the activation also on the two halves of one merged gate-and-up row;
- the rotary kernel equal to ``apply_rotary_pos_emb`` (bit for bit in float16, and in bfloat16
  on CUDA; in the interpreter bfloat16 is held to three units at the inputs' scale);
- tiny Llama and Qwen2 models (Qwen2's projections have biases) with the forwards installed:
  every projection's weight a view of its merged weight (no memory added), the model's logits
  without gradients, twice in a row, and with gradients the module's own forward (gradients
  reach the input);
- the engine's greedy tokens with the forwards and the paged attention's kernels, on the torch
  and then the Triton LoRA backend, equal its tokens without, with base rows alone and with
  LoRA adapters' rows (their deltas added to the merged projections' columns): on a GPU's path
  but for the graph capture (its own process, ``engine``; the rest is ``kernels``);
- the launches of one decode forward, per kernel (``tests/gpu/launch_count.py``).

In-process: what :func:`install` picks and that it does nothing twice; refusals. The CUDA test
is marked ``gpu`` and skipped without a device.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaForCausalLM,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from tests.gpu.interpreter import assert_passes_in_interpreter
from vajra.gpu import fused_kernels, fused_layers


def norm_and_mlp(hidden: int, dtype: torch.dtype, device: str = "cpu") -> tuple[Any, Any]:
    torch.manual_seed(hidden)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden + 3,
        num_attention_heads=4,
        hidden_act="silu",
    )
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm.to(device, dtype), LlamaMLP(config).to(device, dtype)


def ulp_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference in units of the last place of ``want``'s dtype at its value."""
    spacing = torch.finfo(want.dtype).eps * want.float().abs().clamp(min=1e-3)
    return float(((got.float() - want.float()).abs() / spacing).max())


def kernels_check(device: str) -> None:
    """The kernels against the modules (see the module docstring); run on ``device``."""
    for hidden in (64, 200):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            norm, mlp = norm_and_mlp(hidden, dtype, device)
            x = torch.randn(3, 5, hidden, device=device).to(dtype)
            with torch.no_grad():
                want = norm(x)
                got = fused_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
                assert got.shape == want.shape and got.dtype == want.dtype
                if dtype == torch.float32:
                    assert (got - want).abs().max().item() <= 1e-5, hidden
                else:
                    assert ulp_error(got, want) <= 2.5, (hidden, dtype, ulp_error(got, want))
                residual = torch.randn(3, 5, hidden, device=device).to(dtype)
                got_normed, got_sum = fused_kernels.add_rms_norm(
                    x, residual, norm.weight, norm.variance_epsilon
                )
                if dtype != torch.bfloat16 or device == "cuda":  # the same rounding: equal
                    assert torch.equal(got_sum, residual + x), (hidden, dtype)
                else:  # the interpreter truncates to bfloat16 where torch rounds: one unit
                    assert ulp_error(got_sum, residual + x) <= 1.0, hidden
                want_normed = norm(got_sum)  # the sum is checked above
                if dtype == torch.float32:
                    assert (got_normed - want_normed).abs().max().item() <= 1e-5, hidden
                else:
                    assert ulp_error(got_normed, want_normed) <= 2.5, (hidden, dtype)
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
                want_act = mlp.act_fn(gate) * up
                merged = torch.cat((gate, up), dim=-1)  # one gate-and-up row, read in halves
                halves = merged[..., : gate.shape[-1]], merged[..., gate.shape[-1] :]
                for got_act in (
                    fused_kernels.silu_mul(gate, up),
                    fused_kernels.silu_mul(*halves),
                ):
                    if dtype == torch.float32:
                        assert (got_act - want_act).abs().max().item() <= 1e-5
                    else:
                        error = ulp_error(got_act, want_act)
                        assert error <= 2.5, (hidden, dtype, error)
    rotary_check(device)
    norm, _ = norm_and_mlp(64, torch.float32, device)
    wide = torch.randn(4, 128, device=device)[:, ::2]  # a strided row
    with torch.no_grad():
        assert torch.allclose(
            fused_kernels.rms_norm(wide, norm.weight, 1e-5), norm(wide), atol=1e-5
        )
        empty = torch.empty(0, 64, device=device)
        assert fused_kernels.rms_norm(empty, norm.weight, 1e-5).shape == (0, 64)


def rotary_check(device: str) -> None:
    """The rotary kernel against ``apply_rotary_pos_emb`` on the layout the attention passes
    (projections viewed as [1, heads, T, D]), GQA, positions far apart, every dtype."""
    config = LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    rope = LlamaRotaryEmbedding(config).to(device)
    positions = torch.tensor([[0, 1, 2, 7, 300, 1999]], device=device)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(1, 6, 96, device=device).to(dtype)
        cos, sin = rope(x, positions)
        q = torch.randn(1, 6, 96, device=device).to(dtype).view(1, 6, 6, 16).transpose(1, 2)
        k = torch.randn(1, 6, 32, device=device).to(dtype).view(1, 6, 2, 16).transpose(1, 2)
        want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
        got_q, got_k = fused_kernels.rotary(q, k, cos, sin)
        assert got_q.stride() == q.stride() and got_k.dtype == dtype
        for got, want, x in ((got_q, want_q, q), (got_k, want_k, k)):
            if dtype == torch.float32:
                assert (got - want).abs().max().item() <= 1e-5
            elif dtype == torch.float16 or device == "cuda":  # the same roundings: equal
                assert torch.equal(got, want), (dtype, (got.float() - want.float()).abs().max())
            else:  # the interpreter truncates to bfloat16 where torch and CUDA round: a unit
                # of each product and of the sum, at the inputs' scale (a sum may cancel)
                error = (got.float() - want.float()).abs().max().item()
                assert error <= 3 * torch.finfo(dtype).eps * x.float().abs().max().item(), error


def model_check(device: str) -> None:
    """Tiny Llama and Qwen2 models with fused forwards: merged projections that add no
    memory, the same logits without gradients; the module's own forward, and gradients to
    the input, with them."""
    shape: dict[str, Any] = {
        "vocab_size": 97,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
    }
    for model_class, config in (
        (LlamaForCausalLM, LlamaConfig(**shape)),
        (Qwen2ForCausalLM, Qwen2Config(**shape)),  # biases on the query, key and value
    ):
        torch.manual_seed(0)
        model = model_class(config).to(device)
        ids = torch.randint(0, 97, (2, 9), device=device)
        with torch.no_grad():
            want = model(input_ids=ids).logits
        before = storage_bytes(model)
        # per layer two norms, the attention, the MLP and the layer; the last norm, the rotary
        assert fused_layers.install(model) == 5 * 3 + 2
        assert fused_layers.install(model) == 0
        assert storage_bytes(model) == before  # the projections are views of merged weights
        attention = model.model.layers[1].self_attn
        q, v = attention.q_proj, attention.v_proj
        assert v.weight.untyped_storage().data_ptr() == q.weight.untyped_storage().data_ptr()
        if q.bias is not None:  # Qwen2: the biases are merged too
            assert v.bias.untyped_storage().data_ptr() == q.bias.untyped_storage().data_ptr()
        with torch.no_grad():
            got = model(input_ids=ids).logits
            again = model(input_ids=ids).logits  # nothing left over from the first forward
        assert (got - want).abs().max().item() <= 1e-4, model_class
        assert torch.equal(got, again)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=embeds).logits.sum().backward()
        assert embeds.grad is not None and bool(embeds.grad.abs().sum() > 0)


def storage_bytes(model: Any) -> int:
    """Bytes of the distinct storages behind the model's parameters."""
    storages = {
        p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()
    }
    return sum(storages.values())


def engine_check() -> None:
    """The engine on the tiny model gives the same greedy tokens with the fused forwards
    installed (as the engine does on CUDA), with the paged attention's kernels, as without, on
    the static decode path a graph captures: prefill and decode steps, base rows alone and mixed with the rows of two
    adapters (one on the query and value, one on every projection) arriving at other steps."""
    import tempfile

    from tests.gpu.peft_adapters import ADAPTERS, make_adapter
    from vajra.adapters.format import base_model_spec
    from vajra.gpu import paged_attention
    from vajra.gpu.engine import TorchEngine
    from vajra.gpu.interface import GenerationRequest
    from vajra.gpu.lora import pack_adapter_dir
    from vajra.gpu.paged_decode_kernel import paged_decode_attention
    from vajra.gpu.sampling import SamplingParams
    from vajra.gpu.tiny import init_tiny_model

    root = Path(tempfile.mkdtemp())
    model_dir = init_tiny_model(root / "tiny")
    adapters = [
        make_adapter(model_dir, root / name, seed, **ADAPTERS[name])
        for seed, name in enumerate(("r4-qv", "r8-all"), start=1)
    ]
    prompts = ["The river", "Questions, answers, stories and lists", "0 1 2 3", "a b", "x"]
    runs = []
    for install, lora_backend in ((False, "torch"), (True, "torch"), (True, "triton")):
        engine = TorchEngine(
            model_dir, device="cpu", dtype="float32", max_model_len=256, max_adapters=4,
            decode_graphs="eager",
        )  # fmt: skip
        if install:
            assert fused_layers.install(engine.model) == 5 * 2 + 2
        # the paged attention's kernels too (the decode attention and the KV write), and last
        # the Triton LoRA backend, as on CUDA: the whole path a decode graph captures on a GPU
        paged_attention._kernels[torch.device("cpu")] = paged_decode_attention if install else None
        assert engine.lora_state is not None
        engine.lora_state.backend = lora_backend  # type: ignore[assignment]
        assert engine.adapters is not None
        spec = base_model_spec(model_dir)
        layout = engine.adapters.layout
        slots = [engine.adapters.load(pack_adapter_dir(a, spec, layout)) for a in adapters]
        params = SamplingParams(max_tokens=10, ignore_eos=True)
        admit = {  # base rows alone first, then adapter rows join them
            0: [GenerationRequest("base0", prompts[0], params)],
            2: [GenerationRequest("base1", prompts[1], params)],
            4: [GenerationRequest(f"lora{i}", prompts[2], params, s) for i, s in enumerate(slots)]
            + [GenerationRequest("base2", prompts[2], params)],
            6: [GenerationRequest("base3", prompts[4], params)],
        }
        tokens: dict[str, list[int]] = {}
        step = 0
        while step <= max(admit) or engine.has_work():
            for out in engine.step(admit.get(step, []), []):
                assert out.error is None, out.error
                tokens.setdefault(out.request_id, []).extend(out.token_ids)
            step += 1
        runs.append(tokens)
    assert runs[0] == runs[1] == runs[2] and all(len(t) == 10 for t in runs[0].values())
    outputs = [runs[0][name] for name in ("base2", "lora0", "lora1")]  # one prompt each
    assert len({tuple(t) for t in outputs}) == 3  # the adapters change the output


def launch_check() -> None:
    """The static decode forward launches 10 kernels per layer (tests/gpu/launch_count.py):
    the four matmuls, two add-and-norms, the rotary embedding, the activation and the decode
    attention's two (which write the rows' keys and values too); then the step's 5
    (embedding, the rotary table's gather, first norm, row selection, head). No residual add,
    KV write or copy, or output copy of its own. With adapters, 8 more per layer."""
    from tests.gpu.launch_count import count_decode_forward

    layers, counts = count_decode_forward(fused=True, rows=8)
    per_layer = {
        "aten.linear": 4,
        "triton:add_rms_norm": 2,
        "triton:rotary": 1,
        "triton:silu_mul": 1,
        "triton:paged_decode": 2,
    }
    for name, n in per_layer.items():
        assert counts[name] == n * layers + (name == "aten.linear"), (name, counts)
    assert counts["triton:rms_norm"] == 1, counts  # the first layer's; the others come fused
    no_launch = ("aten.add", "aten.index_copy_", "aten.copy_", "triton:write_kv")
    assert not any(counts[n] for n in no_launch), counts
    assert counts["aten.index_select"] == 1, counts  # the rotary table's rows
    assert sum(counts.values()) == 10 * layers + 5, counts
    # with adapters: one BGMV pair for the query, key and value, one for gate and up, one
    # each for the output and down projections
    layers, with_lora = count_decode_forward(fused=True, rows=8, lora=True)
    assert with_lora - counts == Counter({"triton:bgmv": 8 * layers}), with_lora


def test_kernels_in_the_interpreter_equal_the_transformers_modules() -> None:
    assert_passes_in_interpreter(
        "tests.gpu.test_fused_layers", "fused layers interpreter: ok", args=("kernels",)
    )


def test_the_engine_in_the_interpreter_gives_the_plain_engines_tokens() -> None:
    assert_passes_in_interpreter(
        "tests.gpu.test_fused_layers", "fused layers interpreter: ok", args=("engine",)
    )


def test_install_leaves_other_activations_and_modules_alone() -> None:
    pytest.importorskip("triton")
    config = LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, hidden_act="gelu",
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    # the norms, the attention, the layer and the rotary; the GELU MLP keeps its own forward
    assert fused_layers.install(model) == 6
    assert "forward" not in vars(model.model.layers[0].mlp)
    x = torch.randn(2, 32)
    with torch.no_grad():  # without the interpreter or CUDA the module's own forward runs
        norm = model.model.norm
        assert torch.equal(norm(x), type(norm).forward(norm, x))


def test_available_only_on_cuda() -> None:
    assert not fused_layers.available("cpu")


def test_mismatched_inputs_are_refused() -> None:
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="weight"):
        fused_kernels.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="differ"):
        fused_kernels.silu_mul(torch.randn(2, 8), torch.randn(2, 4))
    q, k, cos = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 3, 16)
    with pytest.raises(ValueError):
        fused_kernels.rotary(q, k[..., :8], cos, cos)
    with pytest.raises(ValueError):
        fused_kernels.rotary(q, k.double(), cos, cos)
    with pytest.raises(ValueError):
        fused_kernels.rotary(q, k, cos[:, :2], cos[:, :2])


def test_a_kernel_that_cannot_run_is_reported_not_raised() -> None:
    """Outside the interpreter a CPU launch fails inside Triton: the engine's start-up check
    names it (and the engine installs nothing) instead of raising."""
    pytest.importorskip("triton")
    why = fused_layers.check("cpu", torch.float32, 64, 16)
    assert why is not None and why.split(":")[0].isidentifier()


def test_an_engine_whose_kernels_fail_their_check_serves_without_them(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("triton")
    from vajra.gpu.engine import TorchEngine
    from vajra.gpu.interface import GenerationRequest
    from vajra.gpu.sampling import SamplingParams

    monkeypatch.setattr(fused_layers, "available", lambda device: True)
    engine = TorchEngine(tiny_model_dir, device="cpu", dtype="float32", max_model_len=128)
    assert engine.fused_layers == 0 and engine.fused_layers_error
    assert not any("forward" in vars(m) for m in engine.model.modules())
    request = GenerationRequest("a", "The river", SamplingParams(max_tokens=3, ignore_eos=True))
    tokens = []
    admit = [request]
    while admit or engine.has_work():
        tokens += [t for out in engine.step(admit, []) for t in out.token_ids]
        admit = []
    assert len(tokens) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernels_on_the_gpu_equal_the_transformers_modules() -> None:
    assert fused_layers.available("cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert fused_layers.check("cuda", dtype, 2048, 64) is None, dtype
    kernels_check("cuda")
    model_check("cuda")


if __name__ == "__main__":  # under the interpreter: "kernels" or "engine" (both without)
    import sys

    part = sys.argv[1] if len(sys.argv) > 1 else "all"
    if part in ("kernels", "all"):
        kernels_check("cpu")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert fused_layers.check("cpu", dtype, 200, 24) is None, dtype
        model_check("cpu")
        launch_check()
    if part in ("engine", "all"):
        engine_check()
    print("fused layers interpreter: ok")
