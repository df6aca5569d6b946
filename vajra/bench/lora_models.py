"""The random Llama-shaped models and PEFT adapters the adapter benchmark runs on, by shape.

Shapes are named presets (:data:`SHAPES`): the model is built with random weights (seeded), and
adapters are written in PEFT's on-disk format (config + safetensors) and validated by Vajra,
exactly as a tenant's upload would be.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from transformers import LlamaConfig, LlamaForCausalLM

from vajra.adapters.format import AdapterManifest, BaseModelSpec, validate_adapter
from vajra.gpu.lora import LLAMA_TARGET_MODULES

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {  # vajra.gpu.tiny's shape
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "small": {  # CPU default: big enough that LoRA work is not lost in Python overhead
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    "llama-3.2-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "llama-3-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}


@dataclass(frozen=True)
class BenchAdapter:
    config_json: bytes
    weights: bytes
    manifest: AdapterManifest


def llama_config(shape: str) -> LlamaConfig:
    dims: dict[str, Any] = dict(SHAPES[shape])
    return LlamaConfig(
        **dims,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def spec_for(shape: str) -> BaseModelSpec:
    """The linear modules of a Llama of ``shape``, computed without building it."""
    cfg = SHAPES[shape]
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = hidden // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    modules: dict[str, tuple[int, int]] = {}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape_ in (
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.k_proj", (hidden, kv)),
            ("self_attn.v_proj", (hidden, kv)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (hidden, inter)),
            ("mlp.up_proj", (hidden, inter)),
            ("mlp.down_proj", (inter, hidden)),
        ):
            modules[f"model.layers.{i}.{name}"] = shape_
    modules["lm_head"] = (hidden, cfg["vocab_size"])
    return BaseModelSpec(model_type="llama", modules=modules)


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(llama_config(shape))
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def random_adapter(
    spec: BaseModelSpec,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = LLAMA_TARGET_MODULES,
    seed: int,
    max_rank: int = 256,
) -> BenchAdapter:
    """A LoRA adapter in PEFT's on-disk format (config + safetensors), validated by Vajra."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (in_f, out_f) in spec.modules.items():
        if module.rsplit(".", 1)[-1] in targets:
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) / rank
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
    }
    config_json = json.dumps(config).encode()
    weights = save_safetensors(tensors)
    manifest = validate_adapter(config_json, weights, spec, max_rank=max_rank, max_bytes=1 << 34)
    return BenchAdapter(config_json, weights, manifest)


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
