"""Adapter activation: the time from "adapter in tier X" to "adapter usable in a pool slot".

Built-in tiers: ``pinned`` (an adapter already packed in (pinned) host memory: one copy) and
``page_cache`` (a PEFT ``adapter_model.safetensors`` file just written, so in the OS page cache:
read, validate, pack, copy). Other tiers (disk, object store) plug in as a :data:`TierFactory`,
which receives the adapter's files and returns a loader that fetches it from that tier and
returns a :class:`~vajra.gpu.lora.HostAdapter`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from vajra.adapters.format import BaseModelSpec, validate_adapter
from vajra.bench.lora_models import random_adapter, spec_for, sync_device
from vajra.gpu.lora import HostAdapter, LoraLayout, LoraPool, pack_adapter, read_adapter_tensors

#: (config json, safetensors weights, base spec, pool layout) -> a loader for one tier.
TierFactory = Callable[[bytes, bytes, BaseModelSpec, LoraLayout], Callable[[], HostAdapter]]


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 4),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
        "mean_ms": round(statistics.fmean(ordered), 4),
        "samples": len(ordered),
    }


def pinned_tier(
    config_json: bytes, weights: bytes, spec: BaseModelSpec, layout: LoraLayout
) -> Callable[[], HostAdapter]:
    """Already packed in (pinned) host memory: activation is the copy alone."""
    manifest = validate_adapter(config_json, weights, spec, max_rank=1 << 16, max_bytes=1 << 40)
    host = pack_adapter(manifest, read_adapter_tensors(weights), layout)
    return lambda: host


def page_cache_tier(
    config_json: bytes, weights: bytes, spec: BaseModelSpec, layout: LoraLayout
) -> Callable[[], HostAdapter]:
    """A PEFT directory whose files are in the OS page cache: read, validate, pack, copy."""
    directory = Path(tempfile.mkdtemp(prefix="vajra-bench-"))
    (directory / "adapter_config.json").write_bytes(config_json)
    (directory / "adapter_model.safetensors").write_bytes(weights)

    def load() -> HostAdapter:
        config = (directory / "adapter_config.json").read_bytes()
        data = (directory / "adapter_model.safetensors").read_bytes()
        manifest = validate_adapter(config, data, spec, max_rank=1 << 16, max_bytes=1 << 40)
        return pack_adapter(manifest, read_adapter_tensors(data), layout)

    return load


BUILTIN_TIERS: dict[str, TierFactory] = {"pinned": pinned_tier, "page_cache": page_cache_tier}


def measure_activation(
    *,
    shape: str = "llama-3-8b",
    rank: int = 16,
    device: torch.device,
    dtype: torch.dtype,
    tiers: Mapping[str, TierFactory] | None = None,
    repeats: int = 20,
) -> dict[str, Any]:
    """Median/p90 time from "adapter in tier X" to "adapter usable in a pool slot"."""
    spec = spec_for(shape)
    layout = LoraLayout.from_spec(spec)
    pool = LoraPool(
        layout, device=device, dtype=dtype, max_vram_adapters=2, max_rank=rank, mean_rank=rank
    )
    adapter = random_adapter(spec, rank=rank, alpha=2 * rank, seed=0)
    element = torch.empty((), dtype=dtype).element_size()
    out: dict[str, Any] = {
        "shape": shape,
        "rank": rank,
        "dtype": str(dtype).removeprefix("torch."),
        "safetensors_bytes": len(adapter.weights),
        "pool_bytes": layout.packed_numel(layout.ranks_of(adapter.manifest)) * element,
        "tiers": {},
    }
    for name, factory in {**BUILTIN_TIERS, **(tiers or {})}.items():
        loader = factory(adapter.config_json, adapter.weights, spec, layout)
        if name == "pinned":
            out["pinned_host_memory"] = bool(loader().buffer.is_pinned())
        samples: list[float] = []
        for i in range(repeats + 2):
            sync_device(device)
            start = time.perf_counter()
            slot = pool.load(loader())
            pool.synchronize()
            elapsed = (time.perf_counter() - start) * 1000.0
            pool.free(slot)
            if i >= 2:  # warm-up
                samples.append(elapsed)
        out["tiers"][name] = _percentiles(samples)
    del pool
    return out
