"""Multi-LoRA serving on one frozen base: the adapter pool, the batched layer, injection.

Data flows left to right: validated adapter (vajra.adapters) -> pack_adapter (HostAdapter,
one contiguous host buffer) -> LoraPool.load (slot) -> LoraBatchState.set_rows (row -> slot,
once per forward) -> MultiLoraLinear (every targeted layer adds its row's adapter).
"""

from vajra.gpu.lora.inject import inject_lora, remove_lora
from vajra.gpu.lora.layer import LoraBatchState, MultiLoraLinear, lora_gather, lora_segment
from vajra.gpu.lora.packing import (
    LLAMA_TARGET_MODULES,
    HostAdapter,
    LoraLayout,
    pack_adapter,
    pack_adapter_dir,
    read_adapter_tensors,
)
from vajra.gpu.lora.pool import DEFAULT_RANK_CLASSES, LoraPool, PoolFull

__all__ = [
    "DEFAULT_RANK_CLASSES",
    "LLAMA_TARGET_MODULES",
    "HostAdapter",
    "LoraBatchState",
    "LoraLayout",
    "LoraPool",
    "MultiLoraLinear",
    "PoolFull",
    "inject_lora",
    "lora_gather",
    "lora_segment",
    "pack_adapter",
    "pack_adapter_dir",
    "read_adapter_tensors",
    "remove_lora",
]
