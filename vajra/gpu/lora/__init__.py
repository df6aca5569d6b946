"""Multi-LoRA serving on one frozen base: the paged adapter pool, the batched layer, injection.

Data flows left to right: validated adapter (vajra.adapters) -> pack_adapter (HostAdapter:
rank rows per targeted module kind, one contiguous host buffer) -> LoraPool.load (a slot id and
pages) -> LoraBatchState.set_segments (packed token -> slot, once per forward) ->
MultiLoraLinear (every targeted layer adds each token's adapter).
"""

from vajra.gpu.lora.inject import inject_lora, remove_lora
from vajra.gpu.lora.layer import LoraBatchState, MultiLoraLinear
from vajra.gpu.lora.packing import (
    LLAMA_TARGET_MODULES,
    HostAdapter,
    LoraLayout,
    pack_adapter,
    pack_adapter_dir,
    read_adapter_tensors,
)
from vajra.gpu.lora.pool import DEFAULT_MAX_RANK, DEFAULT_MEAN_RANK, LoraPool, PoolFull
from vajra.gpu.lora.torch_kernels import lora_bgmv, lora_sgmv

__all__ = [
    "DEFAULT_MAX_RANK",
    "DEFAULT_MEAN_RANK",
    "LLAMA_TARGET_MODULES",
    "HostAdapter",
    "LoraBatchState",
    "LoraLayout",
    "LoraPool",
    "MultiLoraLinear",
    "PoolFull",
    "inject_lora",
    "lora_bgmv",
    "lora_sgmv",
    "pack_adapter",
    "pack_adapter_dir",
    "read_adapter_tensors",
    "remove_lora",
]
