"""The engine benchmark's model directory and the engines it runs on it.

:func:`build_bench_model` writes the tiny model of :mod:`vajra.gpu.tiny` (its trained tokenizer
and weights) with room for longer contexts, or a bigger random Llama of
:mod:`vajra.bench.lora_models`' ``small`` shape with the same tokenizer, and zeroes the EOS row
of the output layer so that no request ends early: every request of a workload runs to its own
output length. :func:`make_engine` builds the current engine (``vajra.gpu.load_engine``,
passing the paged-KV settings only where it takes them) or the baseline.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from vajra.adapters.format import BaseModelSpec
from vajra.bench.baseline_engine import load_baseline_engine
from vajra.bench.lora_models import SHAPES
from vajra.gpu.interface import Engine
from vajra.gpu.tiny import init_tiny_model

EngineKind = Literal["current", "baseline"]


def build_bench_model(
    path: Path, *, shape: str = "tiny", max_positions: int = 8192, seed: int = 0
) -> Path:
    """Write the benchmark's model to ``path``; see the module docstring."""
    init_tiny_model(path, seed=seed)
    config: Any = LlamaConfig.from_pretrained(path)
    config.max_position_embeddings = max_positions
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        if shape == "tiny":
            model: Any = LlamaForCausalLM.from_pretrained(path, config=config)
        else:
            dims = {k: v for k, v in SHAPES[shape].items() if k != "vocab_size"}
            for key, value in dims.items():
                setattr(config, key, value)
            config.head_dim = config.hidden_size // config.num_attention_heads
            config.initializer_range = 0.02  # Llama's own: the tiny model's 0.15 is for 64 wide
            model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    with torch.no_grad():
        model.lm_head.weight[config.eos_token_id].zero_()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer_config = path / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings["model_max_length"] = max_positions
    tokenizer_config.write_text(json.dumps(settings, indent=2))
    return path


@dataclass(frozen=True)
class ModelFacts:
    """What the benchmark needs to know of a model directory without loading its weights."""

    max_positions: int
    kv_bytes_per_token: int  # keys and values of every layer, in the benchmark's dtype
    weight_bytes: int  # every parameter once (tied ones once), in the benchmark's dtype
    spec: BaseModelSpec  # its linear layers, for random adapters


def model_facts(model_dir: Path, dtype: torch.dtype) -> ModelFacts:
    config: Any = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    element = torch.empty((), dtype=dtype).element_size()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    modules = {
        name: (int(m.in_features), int(m.out_features))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    return ModelFacts(
        max_positions=int(config.max_position_embeddings),
        kv_bytes_per_token=2 * int(config.num_hidden_layers) * kv_heads * head_dim * element,
        weight_bytes=sum(p.numel() for p in model.parameters()) * element,
        spec=BaseModelSpec(model_type=str(config.model_type), modules=modules),
    )


def make_engine(
    kind: EngineKind,
    model_dir: Path,
    *,
    device: str,
    dtype: str,
    max_batch_size: int,
    max_model_len: int,
    max_adapters: int = 0,
    kv_cache_bytes: int | None = None,
    max_batch_tokens: int | None = None,
    decode_graphs: str | None = None,
) -> tuple[Engine, dict[str, Any]]:
    """The engine, and the settings it was built with (those it did not take left out)."""
    settings: dict[str, Any] = {
        "device": device,
        "dtype": dtype,
        "max_batch_size": max_batch_size,
        "max_model_len": max_model_len,
    }
    if kind == "baseline":
        if max_adapters:
            raise ValueError("the baseline engine serves the base model only")
        return load_baseline_engine(model_dir, **settings), settings
    from vajra.gpu import load_engine

    accepted = inspect.signature(load_engine).parameters
    if max_adapters:
        settings["max_adapters"] = max_adapters
    for name, value in (
        ("kv_cache_bytes", kv_cache_bytes),
        ("max_batch_tokens", max_batch_tokens),
        ("decode_graphs", decode_graphs),
    ):
        if value is not None and name in accepted:
            settings[name] = value
    return load_engine(str(model_dir), **settings), settings
