"""Adapter tiers built without an executor: the tiny model's spec, a small CPU LoRA pool (the
torch engine's AdapterResidency, standing in for an engine), real PEFT adapters in a local
object store, and the GPU limiter held from outside like an engine step.

``tiers_mod`` is the module under test; tests patch its names (``pack_adapter``) and build
through :func:`make_tiers`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import trio

from tests.reference import save_peft_adapters
from vajra.actors import adapter_tiers as tiers_mod
from vajra.actors.base import wait_until
from vajra.adapters.format import BaseModelSpec, base_model_spec, validate_adapter
from vajra.config import VajraConfig
from vajra.gpu.lora import LoraPool, pack_adapter_dir
from vajra.storage import LocalObjectStore, adapter_object_key, put_adapter_objects

TENANT = "t_kit"


@dataclass(frozen=True)
class KitAdapter:
    path: Path
    rank: int
    digest: str
    key: str
    size_bytes: int


save_adapters = save_peft_adapters


def store_adapters(
    store: LocalObjectStore, paths: Sequence[Path], spec: BaseModelSpec
) -> list[KitAdapter]:
    out = []
    for path in paths:
        config = (path / "adapter_config.json").read_bytes()
        weights = (path / "adapter_model.safetensors").read_bytes()
        manifest = validate_adapter(config, weights, spec, max_rank=64, max_bytes=1 << 30)
        key = adapter_object_key(TENANT, manifest.digest)
        put_adapter_objects(store, key, config, weights)
        out.append(
            KitAdapter(path, manifest.rank, manifest.digest, key, len(config) + len(weights))
        )
    return out


def make_pool(spec: BaseModelSpec, slots: int, mean_rank: int) -> LoraPool:
    """``slots`` adapters at once, with pages for ``slots`` adapters of rank ``mean_rank`` on
    every module kind."""
    return LoraPool.for_spec(spec, max_vram_adapters=slots, max_rank=64, mean_rank=mean_rank)


def make_tiers(
    tmp: Path,
    model_dir: Path,
    pool: LoraPool,
    limiter: trio.CapacityLimiter,
    *,
    host_cache_bytes: int = 1,  # one host slot per size class
    disk_cache_bytes: int = 1 << 30,
    threshold: float = 1.0,
    host_rank_classes: Sequence[int] | None = None,
) -> tiers_mod.AdapterTiers:
    cfg = (
        VajraConfig()
        .replace("cluster", home=str(tmp / "home"), model=str(model_dir))
        .replace("storage", local_dir=str(tmp / "objects"))
        .replace(
            "adapters",
            cache_dir=str(tmp / "disk"),
            host_cache_bytes=host_cache_bytes,
            disk_cache_bytes=disk_cache_bytes,
            lru_eviction_threshold=threshold,
            max_vram_adapters=pool.num_slots,
        )
    )
    store = LocalObjectStore(cfg.storage.local_dir)
    return tiers_mod.AdapterTiers(
        cfg,
        pool,
        base_model_spec(model_dir),
        store,
        gpu_limiter=limiter,
        host_rank_classes=host_rank_classes,
    )


def expected_units(adapter: KitAdapter, spec: BaseModelSpec, pool: LoraPool) -> torch.Tensor:
    """The adapter packed from its own files for ``pool``: what its slot must hold."""
    host = pack_adapter_dir(adapter.path, spec, pool.layout, dtype=pool.dtype, pin=False)
    return host.buffer.clone()


def slot_holds(pool: LoraPool, slot: int, adapter: KitAdapter, want: torch.Tensor) -> bool:
    return (
        pool.is_loaded(slot)
        and pool.digest_of(slot) == adapter.digest
        and torch.equal(pool.read_back(slot), want)
    )


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` (it watches other tasks and worker threads) until it holds."""
    with trio.fail_after(timeout_s):
        await wait_until(predicate, poll_s=0.002)


class EngineStep:
    """Holds the GPU limiter from outside, as the engine does for a whole step."""

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter

    async def hold(self) -> None:
        await self.limiter.acquire_on_behalf_of(self)

    def end(self) -> None:
        self.limiter.release_on_behalf_of(self)

    def waiting(self) -> int:
        return self.limiter.statistics().tasks_waiting
