"""Loading an engine by name: the null engine, or a model directory for the torch engine."""

from __future__ import annotations

from pathlib import Path

from vajra.gpu.decode_graphs import GraphMode
from vajra.gpu.engine import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_BATCH_TOKENS, TorchEngine
from vajra.gpu.interface import Engine
from vajra.gpu.null_engine import NullEngine


def load_engine(
    model: str,
    *,
    device: str | None = None,
    dtype: str = "auto",
    max_batch_size: int = 32,
    max_model_len: int = 2048,
    max_adapters: int = 0,
    max_adapter_rank: int = 64,
    kv_cache_bytes: int | None = None,
    kv_memory_fraction: float = 0.9,
    kv_block_size: int = DEFAULT_BLOCK_SIZE,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    decode_graphs: GraphMode = "auto",
    fused_layers: bool = True,
) -> Engine:
    """``"null"`` gives a :class:`NullEngine`; anything else is a model directory for TorchEngine
    (with a LoRA pool of ``max_adapters`` slots when that is above zero)."""
    if model == "null":
        return NullEngine(
            device=device, dtype=dtype, max_batch_size=max_batch_size, max_model_len=max_model_len
        )
    return TorchEngine(
        Path(model),
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_model_len=max_model_len,
        max_adapters=max_adapters,
        max_adapter_rank=max_adapter_rank,
        kv_cache_bytes=kv_cache_bytes,
        kv_memory_fraction=kv_memory_fraction,
        block_size=kv_block_size,
        max_batch_tokens=max_batch_tokens,
        decode_graphs=decode_graphs,
        fused_layers=fused_layers,
    )
