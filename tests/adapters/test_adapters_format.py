"""PEFT adapter parsing and validation against real adapters saved by PEFT on the tiny model.

Rules: every good adapter here is written by ``PeftModel.save_pretrained`` itself; every bad one
is derived from a good one by one change, and the refusal's message must name that change.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM

from tests.adapters.conftest import edit_config, save_peft
from vajra.adapters import (
    BaseModelSpec,
    InvalidAdapter,
    base_model_spec,
    parse_lora_key,
    read_safetensors_header,
    validate_adapter,
    validate_adapter_dir,
)
from vajra.errors import InvalidRequest

LIMITS: dict[str, Any] = {"max_rank": 64, "max_bytes": 10_000_000}


def refused(config: bytes, weights: bytes, spec: BaseModelSpec, *words: str, **limits: Any) -> str:
    with pytest.raises(InvalidAdapter) as info:
        validate_adapter(config, weights, spec, **{**LIMITS, **limits})
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert info.value.field == "adapter"
    assert isinstance(info.value, InvalidRequest)
    return message


def test_base_model_spec_matches_the_real_model(tiny_model_dir: Path, spec: BaseModelSpec) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    linears = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    assert spec.modules == linears
    assert spec.model_type == "llama"
    assert spec.modules["model.layers.0.self_attn.k_proj"] == (64, 32)
    assert base_model_spec(tiny_model_dir) == spec  # cached


def test_manifest_of_a_peft_adapter(spec: BaseModelSpec, good: tuple[bytes, bytes]) -> None:
    config, weights = good
    manifest = validate_adapter(config, weights, spec, **LIMITS)
    assert manifest.target_modules == ("down_proj", "q_proj", "v_proj")
    assert len(manifest.modules) == 6
    assert manifest.ranks["model.layers.1.mlp.down_proj"] == 4
    assert manifest.ranks["model.layers.1.self_attn.q_proj"] == 8
    assert manifest.rank == 8
    assert manifest.alphas["model.layers.0.self_attn.v_proj"] == 3.0
    assert manifest.alphas["model.layers.0.self_attn.q_proj"] == 16.0
    assert manifest.scale("model.layers.0.self_attn.q_proj") == 2.0
    assert manifest.scale("model.layers.0.mlp.down_proj") == 4.0
    assert manifest.dtype == "F32"
    assert manifest.size_bytes == len(config) + len(weights)
    assert len(manifest.digest) == 64
    assert validate_adapter(config, weights, spec, **LIMITS).digest == manifest.digest
    other = validate_adapter(edit_config(config, lora_alpha=17), weights, spec, **LIMITS)
    assert other.digest != manifest.digest


def test_rslora_scale_and_regex_targets(
    tiny_model_dir: Path, spec: BaseModelSpec, tmp_path: Path
) -> None:
    out = save_peft(
        tiny_model_dir,
        tmp_path,
        r=16,
        lora_alpha=8,
        use_rslora=True,
        target_modules=r".*\.layers\.1\..*_proj",
    )
    manifest = validate_adapter_dir(out, spec, **LIMITS)
    assert manifest.use_rslora
    assert len(manifest.modules) == 7
    assert all(".layers.1." in m for m in manifest.modules)
    assert math.isclose(manifest.scale(manifest.modules[0]), 8 / math.sqrt(16))


def test_half_precision_weights_are_accepted(
    spec: BaseModelSpec, good: tuple[bytes, bytes]
) -> None:
    config, weights = good
    from safetensors.torch import load

    for dtype, name in ((torch.float16, "F16"), (torch.bfloat16, "BF16")):
        tensors = {k: v.to(dtype) for k, v in load(weights).items()}
        assert validate_adapter(config, save_safetensors(tensors), spec, **LIMITS).dtype == name


def test_key_naming() -> None:
    path = "model.layers.0.self_attn.q_proj"
    assert parse_lora_key(f"base_model.model.{path}.lora_A.weight") == (path, "A")
    assert parse_lora_key(f"base_model.model.{path}.lora_B.default.weight") == (path, "B")
    assert parse_lora_key(f"{path}.lora_A.weight") == (path, "A")
    assert parse_lora_key(f"base_model.model.{path}.lora_magnitude_vector") is None
    assert parse_lora_key(f"base_model.model.{path}.base_layer.weight") is None


def test_adapter_name_segment_is_accepted(spec: BaseModelSpec, good: tuple[bytes, bytes]) -> None:
    from safetensors.torch import load

    config, weights = good
    renamed = {k.replace(".weight", ".tenant7.weight"): v for k, v in load(weights).items()}
    manifest = validate_adapter(config, save_safetensors(renamed), spec, **LIMITS)
    assert len(manifest.modules) == 6


# ---------------------------------------------------------------- refusals


def test_pickle_is_refused(spec: BaseModelSpec, good: tuple[bytes, bytes]) -> None:
    from safetensors.torch import load

    config, weights = good
    buffer = io.BytesIO()
    torch.save(load(weights), buffer)  # what adapter_model.bin holds
    refused(config, buffer.getvalue(), spec, "pickle")
    refused(config, pickle.dumps({"a": 1}), spec, "pickle")


def test_pickle_directory_is_refused(spec: BaseModelSpec, tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(InvalidAdapter, match="pickle"):
        validate_adapter_dir(tmp_path, spec, **LIMITS)


def test_truncated_and_corrupt_safetensors(spec: BaseModelSpec, good: tuple[bytes, bytes]) -> None:
    config, weights = good
    refused(config, weights[:-10], spec, "truncated")
    refused(config, weights[:100], spec, "truncated")
    refused(config, weights[:5], spec, "not safetensors")
    refused(config, b"", spec, "not safetensors")
    refused(config, struct.pack("<Q", 7) + b"garbage" + b"\0" * 16, spec, "not JSON")
    header_len = struct.unpack("<Q", weights[:8])[0]
    header = json.loads(weights[8 : 8 + header_len])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10**6
    blob = json.dumps(header).encode()
    refused(config, struct.pack("<Q", len(blob)) + blob + weights[8 + header_len :], spec, name)


def test_config_errors(spec: BaseModelSpec, good: tuple[bytes, bytes]) -> None:
    config, weights = good
    refused(b"not json", weights, spec, "not JSON")
    refused(b"[1, 2]", weights, spec, "JSON object")
    refused(edit_config(config, peft_type="IA3"), weights, spec, "IA3", "LORA")
    refused(edit_config(config, use_dora=True), weights, spec, "DoRA")
    refused(edit_config(config, bias="all"), weights, spec, "bias")
    refused(edit_config(config, modules_to_save=["lm_head"]), weights, spec, "modules_to_save")
    refused(edit_config(config, r=0), weights, spec, "r must be")
    refused(edit_config(config, target_modules=None), weights, spec, "target_modules")


def test_config_naming_missing_modules(spec: BaseModelSpec, good: tuple[bytes, bytes]) -> None:
    config, weights = good
    bad = edit_config(config, target_modules=["q_proj", "v_proj", "down_proj", "c_attn"])
    refused(bad, weights, spec, "c_attn", "lacks")
    refused(edit_config(config, target_modules=r".*\.nothing"), weights, spec, "matches no module")


def test_weights_for_modules_outside_target_modules(
    spec: BaseModelSpec, good: tuple[bytes, bytes]
) -> None:
    config, weights = good
    refused(edit_config(config, target_modules=["q_proj", "v_proj"]), weights, spec, "down_proj")


def test_rank_over_the_limit(spec: BaseModelSpec, good: tuple[bytes, bytes]) -> None:
    config, weights = good
    refused(config, weights, spec, "rank 8", "limit is 4", max_rank=4)


def test_oversized(spec: BaseModelSpec, good: tuple[bytes, bytes]) -> None:
    config, weights = good
    refused(config, weights, spec, "bytes", "limit", max_bytes=len(weights))


def test_wrong_shapes_and_missing_modules(spec: BaseModelSpec, good: tuple[bytes, bytes]) -> None:
    from safetensors.torch import load

    config, weights = good
    tensors = load(weights)
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    q_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"

    wide = dict(tensors)
    wide[q_a] = torch.zeros(8, 65)
    refused(config, save_safetensors(wide), spec, "q_proj", "shapes")

    rank = dict(tensors)
    rank[q_a], rank[q_b] = torch.zeros(6, 64), torch.zeros(64, 6)
    refused(config, save_safetensors(rank), spec, "rank 6", "config says 8")

    no_b = dict(tensors)
    del no_b[q_b]
    refused(config, save_safetensors(no_b), spec, "no lora_B")

    stray = dict(tensors)
    stray["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 64)
    refused(config, save_safetensors(stray), spec, "layers.9", "lacks")

    extra = dict(tensors)
    extra["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.zeros(
        64
    )
    refused(config, save_safetensors(extra), spec, "unsupported tensor")

    refused(config, save_safetensors({}), spec, "no tensors")


def test_dtype_not_convertible(spec: BaseModelSpec, good: tuple[bytes, bytes]) -> None:
    from safetensors.torch import load

    config, weights = good
    tensors = {k: v.to(torch.int32) for k, v in load(weights).items()}
    refused(config, save_safetensors(tensors), spec, "I32")
    tensors = {k: v.to(torch.float64) for k, v in load(weights).items()}
    refused(config, save_safetensors(tensors), spec, "F64")


def test_header_parser_locates_every_tensor(good: tuple[bytes, bytes]) -> None:
    from safetensors.torch import load

    _, weights = good
    infos = read_safetensors_header(weights)
    loaded = load(weights)
    assert set(infos) == set(loaded)
    for name, info in infos.items():
        raw = torch.frombuffer(bytearray(weights[info.start : info.end]), dtype=torch.float32)
        assert torch.equal(raw.view(info.shape), loaded[name])


def test_modules_outside_the_served_set_are_refused(
    spec: BaseModelSpec, good: tuple[bytes, bytes]
) -> None:
    from safetensors.torch import load

    config, weights = good
    tensors = load(weights)
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 64)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(1024, 8)
    config = edit_config(config, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"])
    refused(config, save_safetensors(tensors), spec, "lm_head", "not served")
    manifest = validate_adapter(config, save_safetensors(tensors), spec, servable=None, **LIMITS)
    assert "lm_head" in manifest.modules
