"""Serialising an adapter held in memory for upload: torch tensors and numpy arrays become the
same two files a PEFT directory holds, and careless input is refused before anything is sent.

Test rules: no sockets; the gateway's own validator checks what the client produced.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load

from vajra.client import InvalidRequest
from vajra.client._adapter_files import adapter_bytes_from_tensors

NAME = "base_model.model.model.layers.0.self_attn.q_proj"
CONFIG = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def test_torch_and_numpy_tensors_round_trip_through_safetensors() -> None:
    a = torch.randn(2, 8, dtype=torch.bfloat16)
    b = np.arange(16, dtype=np.float32).reshape(8, 2)
    config, weights = adapter_bytes_from_tensors(
        {f"{NAME}.lora_A.weight": a, f"{NAME}.lora_B.weight": b}, CONFIG
    )
    assert json.loads(config) == {"peft_type": "LORA", **CONFIG}
    back = load(weights)
    assert torch.equal(back[f"{NAME}.lora_A.weight"], a)
    assert torch.equal(back[f"{NAME}.lora_B.weight"], torch.from_numpy(b))
    # numpy only: no torch needed on the way.
    _, w2 = adapter_bytes_from_tensors({f"{NAME}.lora_B.weight": b}, CONFIG)
    assert torch.equal(load(w2)[f"{NAME}.lora_B.weight"], torch.from_numpy(b))
    # A non-contiguous view is written as its values.
    t = torch.randn(8, 2).t()
    _, w3 = adapter_bytes_from_tensors({f"{NAME}.lora_A.weight": t}, CONFIG)
    assert torch.equal(load(w3)[f"{NAME}.lora_A.weight"], t)


@pytest.mark.parametrize(
    ("tensors", "config", "field"),
    [
        ({}, CONFIG, "tensors"),
        ([1, 2], CONFIG, "tensors"),
        ({"": torch.zeros(1)}, CONFIG, "tensors"),
        ({1: torch.zeros(1)}, CONFIG, "tensors"),
        ({"x": [1.0, 2.0]}, CONFIG, "tensors"),
        ({"x": np.array([object()])}, CONFIG, "tensors"),
        ({"x": torch.zeros(1)}, "r=2", "lora_config"),
        ({"x": torch.zeros(1)}, {1: 2}, "lora_config"),
        ({"x": torch.zeros(1)}, {"r": float("nan")}, "lora_config"),
        ({"x": torch.zeros(1)}, {"r": object()}, "lora_config"),
    ],
)
def test_careless_input_is_refused_naming_the_field(tensors: Any, config: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        adapter_bytes_from_tensors(tensors, config)
    assert err.value.field == field
