"""The executor's adapter tiers: object store → local disk → pinned host memory → GPU slots.

Every tier is bounded and evicts least-recently-used, and the GPU tier never evicts an adapter
that a running request holds (a reference count per adapter, taken at admission and released
when the request ends) or that an acquire in progress is waiting for. Adapters are addressed by
content digest, so a new version (a new digest) loads into a free slot while requests on the
old one finish on its old slot — the atomic swap — and a digest that does not match its bytes
is refused as corrupt.

* disk: ``<cache_dir>/<digest>/{adapter_config.json, adapter_model.safetensors}``, bounded in
  bytes (``adapters.disk_cache_bytes``), LRU; found again after a restart.
* host: one buffer allocated once at start (pinned when CUDA is present: pinning is slow), cut
  into fixed slots per size class (packed adapters of a few ranks on every module kind), so
  caching never fragments it (``adapters.host_cache_bytes``).
* GPU: the engine's adapter slots, driven only through
  :class:`~vajra.gpu.interface.AdapterResidency` (``adapters.max_vram_adapters`` slots, memory
  per targeted module kind); to make room, an idle adapter whose eviction gives back what the
  new one lacks leaves; past ``adapters.lru_eviction_threshold`` of its slots in use, idle
  adapters are evicted down to the threshold (both picked by
  :mod:`vajra.actors.adapter_forecasts`: farthest forecast first while the predictor's
  forecasts are fresh, else least recently used). Which adapter leaves a tier is
  :mod:`vajra.policies.eviction`'s choice.

Concurrency. The executor's Trio thread owns every tier's tables, the host slab's and the disk
cache's included (:mod:`vajra.actors.adapter_cache`); worker threads only do pure work: file
reads and writes on paths chosen here, hashing, validation, packing into a host slot reserved
here, and the copy into a GPU slot, under the GPU limiter that the engine holds for a whole
step.

* One task per digest loads it (single flight); later callers wait for that load and share
  its error. Acquires in progress are counted per digest and eviction skips those digests, so a
  load is never undone before its callers take their reference (no load/evict loop).
* A host slot is pinned from before its load waits for the GPU limiter until the copy out of it
  is done (on CUDA, until the copy's event completes); a pinned slot is never evicted or handed
  out again. When every slot that fits is busy, the load packs into an uncached staging buffer
  (at most :data:`STAGING_BUFFERS` at once; past ``busy_wait_s`` waiting for one, a retriable
  OverloadedError).
* When every GPU slot that fits is held, :meth:`AdapterTiers.acquire` answers a retriable
  OverloadedError at once.

Errors: :meth:`AdapterTiers.acquire` and :meth:`AdapterTiers.promote` raise only VajraErrors.
A failing disk cache costs the cache, not the request (counted in ``stats["disk"].errors``);
an unexpected exception (a torch ``RuntimeError``, an ``OSError``) is logged and becomes
InternalError (UnavailableError for ``OSError``, OverloadedError for out-of-memory). On
cancellation every reservation and pin is given back. Counters and load-time histograms per
tier are in :attr:`AdapterTiers.stats`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import trio

from vajra.actors.adapter_cache import (
    LOAD_MS_BUCKETS,
    DiskCache,
    HostEntry,
    HostSlab,
    TierStats,
    digest_of,
    typed_load_error,
)
from vajra.actors.adapter_forecasts import Forecasts
from vajra.adapters.format import AdapterManifest, BaseModelSpec, InvalidAdapter, validate_adapter
from vajra.config import VajraConfig
from vajra.errors import OverloadedError, VajraError
from vajra.gpu.interface import AdapterResidency
from vajra.gpu.lora import HostAdapter, pack_adapter, read_adapter_tensors
from vajra.storage import ObjectStore
from vajra.storage.adapters import aget_adapter_objects

__all__ = [
    "LOAD_MS_BUCKETS",
    "STAGING_BUFFERS",
    "TIERS",
    "AdapterTiers",
    "DiskCache",
    "HostSlab",
    "TierStats",
]

log = logging.getLogger("vajra.executor.tiers")

TIERS = ("gpu", "host", "disk", "store")
#: Adapters packed at once into uncached staging buffers while every fitting host slot is busy.
STAGING_BUFFERS = 4
_MAX_TRIES = 4  # loads (own or awaited) one acquire tries before answering overloaded
FORECAST_TICKS = 4  # the predictor's forecasts stay fresh this many of its plan intervals

Tier = Literal["gpu", "host", "disk"]


@dataclass(eq=False)
class _Flight:
    """The one load of a digest in progress; waiters read ``error`` once ``done`` is set."""

    tier: Tier
    done: trio.Event = field(default_factory=trio.Event)
    error: VajraError | None = None


class AdapterTiers:
    """Moves adapters between tiers for one executor; see the module docstring.

    ``busy_wait_s`` bounds how long a load waits for a staging buffer; ``host_rank_classes``
    sizes the host slots (default: the pool's largest rank, its half, quarter and eighth).
    """

    def __init__(
        self,
        cfg: VajraConfig,
        slots: AdapterResidency,
        base: BaseModelSpec,
        store: ObjectStore,
        *,
        gpu_limiter: trio.CapacityLimiter,
        busy_wait_s: float = 2.0,
        host_rank_classes: Sequence[int] | None = None,
    ) -> None:
        a = cfg.adapters
        self.cfg = cfg
        self.slots = slots
        self.base = base
        self.store = store
        self._gpu_limiter = gpu_limiter
        self._io = trio.CapacityLimiter(4)
        self._staging = trio.CapacityLimiter(STAGING_BUFFERS)
        self._busy_wait_s = busy_wait_s
        self.stats: dict[str, TierStats] = {t: TierStats() for t in TIERS}
        self.forecasts = Forecasts(FORECAST_TICKS * 1000.0 * cfg.predictor.plan_interval_s)
        cache_dir = (
            Path(a.cache_dir).expanduser()
            if a.cache_dir
            else cfg.cluster.home_path / "cache" / "adapters"
        )
        self.disk = DiskCache(cache_dir, a.disk_cache_bytes, io=self._io, stats=self.stats["disk"])
        ranks = host_rank_classes or sorted({max(1, slots.max_rank >> s) for s in range(4)})
        self.host = HostSlab(
            [slots.layout.packed_numel((r,) * len(slots.layout.kinds)) for r in ranks],
            a.host_cache_bytes,
            slots.dtype,
            stats=self.stats["host"],
        )
        self.gpu: OrderedDict[str, int] = OrderedDict()  # digest -> slot, least recent first
        self.refs: Counter[str] = Counter()  # held by running requests
        self._wanted: Counter[str] = Counter()  # acquires in progress
        self._loading: dict[str, _Flight] = {}

    async def aclose(self) -> None:
        """Release the object store's connections (bounded in time, even when cancelled)."""
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            await trio.to_thread.run_sync(self.store.close)

    # --- the request path -----------------------------------------------------------------

    async def acquire(self, digest: str, object_key: str) -> int:
        """Make ``digest`` resident on the GPU and hold it there; returns its slot.

        Every :meth:`acquire` must be matched by one :meth:`release`. Raises only VajraErrors:
        NotFoundError, UnavailableError, InvalidAdapter for corrupt files, OverloadedError
        (retriable) when every slot that fits is held by running requests.
        """
        self._wanted[digest] += 1
        try:
            return await self._acquire(digest, object_key)
        except VajraError:
            raise
        except Exception as exc:
            raise typed_load_error(exc, digest) from exc
        finally:
            self._wanted[digest] -= 1
            if self._wanted[digest] <= 0:
                del self._wanted[digest]

    async def _acquire(self, digest: str, object_key: str) -> int:
        for _ in range(_MAX_TRIES):
            slot = self.gpu.get(digest)
            if slot is not None:  # the reference is taken in the step that finds it resident
                self.stats["gpu"].hits += 1
                self.refs[digest] += 1
                self.gpu.move_to_end(digest)
                return slot
            flight = self._loading.get(digest)
            if flight is not None:
                await flight.done.wait()
                if flight.tier == "gpu" and flight.error is not None and digest not in self.gpu:
                    raise copy.copy(flight.error)  # a promotion's failure is not ours: retry
                continue
            self.stats["gpu"].misses += 1
            await self._load(digest, object_key, "gpu")
        raise OverloadedError(f"adapter {digest[:12]} did not stay resident; retry")

    def release(self, digest: str) -> None:
        self.refs[digest] -= 1
        if self.refs[digest] <= 0:
            del self.refs[digest]

    def resident(self) -> list[str]:
        return list(self.gpu)

    # --- promote / demote (the predictor's commands) --------------------------------------

    async def promote(self, digest: str, object_key: str, tier: str) -> None:
        """Bring an adapter up to ``tier`` ("gpu", "host" or "disk") ahead of demand."""
        if tier not in ("gpu", "host", "disk"):
            raise InvalidAdapter(f"cannot promote to tier {tier!r}")
        if tier == "gpu":
            await self.acquire(digest, object_key)
            self.release(digest)
            return
        try:
            for _ in range(_MAX_TRIES):
                if digest in self.gpu or self.host.get(digest) is not None:
                    return
                if tier == "disk" and digest in self.disk:
                    return
                flight = self._loading.get(digest)
                if flight is None:
                    await self._load(digest, object_key, "host" if tier == "host" else "disk")
                    return
                await flight.done.wait()
        except VajraError:
            raise
        except Exception as exc:
            raise typed_load_error(exc, digest) from exc

    def may_prefetch(self, digest: str, expected_ms: float | None) -> bool:
        """Whether a GPU prefetch of ``digest`` (expected at ``expected_ms``) may take a slot:
        one is free, or an idle adapter is forecast later than it (else it is declined)."""
        full = len(self.gpu) >= self.slots.num_slots and digest not in self.gpu
        return not full or self.forecasts.victim(self.gpu, self._in_use, expected_ms) is not None

    def demote(self, digest: str, tier: str) -> None:
        """Drop an adapter from ``tier`` and every tier above it (a held GPU copy stays)."""
        if tier not in ("gpu", "host", "disk"):
            raise InvalidAdapter(f"cannot demote from tier {tier!r}")
        if digest in self.gpu and not self._in_use(digest):
            self._evict_gpu(digest)
        if tier in ("host", "disk"):
            self.host.drop(digest)
        if tier == "disk":
            self.disk.forget(digest)

    # --- loading --------------------------------------------------------------------------

    async def _load(self, digest: str, object_key: str, tier: Tier) -> None:
        """Bring ``digest`` up to ``tier`` as the one load of it in flight."""
        flight = self._loading[digest] = _Flight(tier)
        try:
            await self._load_once(digest, object_key, tier)
        except VajraError as exc:
            flight.error = exc
            raise
        except Exception as exc:
            flight.error = typed_load_error(exc, digest)
            raise flight.error from exc
        finally:
            del self._loading[digest]
            flight.done.set()

    async def _load_once(self, digest: str, object_key: str, tier: Tier) -> None:
        entry = self.host.get(digest)
        if entry is not None and entry.host is not None:
            self.stats["host"].hits += 1
            if tier == "gpu":
                await self._copy_out(digest, entry, entry.host)
            return
        self.stats["host"].misses += 1
        config, weights = await self._bytes(digest, object_key)
        if tier == "disk":
            return
        t0 = time.perf_counter()
        manifest, tensors = await trio.to_thread.run_sync(
            self._validate, config, weights, limiter=self._io
        )
        layout = self.slots.layout
        entry = self.host.reserve(digest, layout.packed_numel(layout.ranks_of(manifest)))
        if entry is None:  # every slot that fits is busy: stage it, uncached
            if tier != "gpu":
                raise OverloadedError("every host slot that fits this adapter is busy; retry")
            await self._load_staged(digest, manifest, tensors)
            return
        packed = False
        try:
            host = await trio.to_thread.run_sync(
                self._pack, manifest, tensors, entry.buffer, limiter=self._io
            )
            packed = True
        finally:
            if not packed:
                self.host.cancel(entry)
        self.host.put(entry, host)
        self.stats["host"].observe((time.perf_counter() - t0) * 1e3)
        if tier == "gpu":
            await self._copy_out(digest, entry, host)

    async def _copy_out(self, digest: str, entry: HostEntry, host: HostAdapter) -> None:
        """Copy a cached adapter to the GPU, its host slot pinned until the copy is done."""
        self.host.pin(entry)
        event = None
        try:
            event = await self._to_gpu(digest, host)
        finally:
            self.host.unpin(entry, event)

    async def _load_staged(
        self, digest: str, manifest: AdapterManifest, tensors: dict[str, torch.Tensor]
    ) -> None:
        """Pack into a new staging buffer (not cached) and copy that to the GPU."""
        with trio.move_on_after(self._busy_wait_s) as waited:
            await self._staging.acquire()
        if waited.cancelled_caught:
            raise OverloadedError("every host buffer for this adapter's rank is busy; retry")
        try:
            host = await trio.to_thread.run_sync(
                self._pack, manifest, tensors, None, limiter=self._io
            )
            await self._to_gpu(digest, host)  # kept alive by the slots until copied
        finally:
            self._staging.release()

    async def _bytes(self, digest: str, object_key: str) -> tuple[bytes, bytes]:
        t0 = time.perf_counter()
        data = await self.disk.read(digest)
        if data is not None:
            self.stats["disk"].hits += 1
            self.stats["disk"].observe((time.perf_counter() - t0) * 1e3)
            if await trio.to_thread.run_sync(digest_of, *data, limiter=self._io) == digest:
                return data
            log.error("disk copy of adapter %s is corrupt; fetching it again", digest)
            self.disk.forget(digest)
        self.stats["disk"].misses += 1
        t0 = time.perf_counter()
        config, weights = await aget_adapter_objects(self.store, object_key)
        self.stats["store"].observe((time.perf_counter() - t0) * 1e3)
        if await trio.to_thread.run_sync(digest_of, config, weights, limiter=self._io) != digest:
            raise InvalidAdapter(f"adapter files under {object_key!r} are corrupt: digest mismatch")
        await self.disk.write(digest, config, weights)  # a failure is counted, not raised
        return config, weights

    def _validate(
        self, config: bytes, weights: bytes
    ) -> tuple[AdapterManifest, dict[str, torch.Tensor]]:
        """(worker thread) Check the files against the base model; decode the tensors."""
        a = self.cfg.adapters
        manifest = validate_adapter(
            config, weights, self.base, max_rank=a.max_rank, max_bytes=a.max_adapter_bytes
        )
        return manifest, read_adapter_tensors(weights)

    def _pack(
        self,
        manifest: AdapterManifest,
        tensors: dict[str, torch.Tensor],
        out: torch.Tensor | None,
    ) -> HostAdapter:
        """(worker thread) Pack into ``out``, a host slot reserved by the owner, or a new
        unpinned buffer."""
        layout, dtype = self.slots.layout, self.slots.dtype
        return pack_adapter(manifest, tensors, layout, dtype=dtype, pin=False, out=out)

    async def _to_gpu(self, digest: str, host: HostAdapter) -> Any:
        """Copy ``host`` into a free slot (evicting an idle adapter if needed) and list it
        as resident; returns the copy's CUDA event (None on the CPU)."""
        t0 = time.perf_counter()
        async with self._gpu_limiter:
            while not self.slots.can_load(host):
                if not self._evict_lru(host):
                    raise OverloadedError(
                        "no room: the adapters in the way are held by running requests; retry"
                    )
            slot, event = await trio.to_thread.run_sync(self._copy_in, host)
        self.gpu[digest] = slot
        self.stats["gpu"].observe((time.perf_counter() - t0) * 1e3)
        self._trim_to_threshold()
        return event

    def _copy_in(self, host: HostAdapter) -> tuple[int, Any]:
        """(worker thread, GPU limiter held) Load into a slot; the slot and its copy event."""
        slot = self.slots.load(host)
        return slot, self.slots.copy_event(slot)

    def _in_use(self, digest: str) -> bool:
        """Held by a request or wanted by an acquire in progress."""
        return bool(self.refs.get(digest) or self._wanted.get(digest))

    def _evict_lru(self, host: HostAdapter) -> bool:
        """Evict an idle adapter whose eviction gives back something ``host`` lacks (a slot, or
        memory of a kind it targets): the one forecast farthest away, else the LRU one."""
        helping = (d for d, slot in self.gpu.items() if self.slots.frees_room_for(slot, host))
        victim = self.forecasts.victim(helping, self._in_use)
        if victim is None:
            return False
        self._evict_gpu(victim)
        return True

    def _evict_gpu(self, digest: str) -> None:
        slot = self.gpu.pop(digest)
        self.slots.free(slot)
        self.stats["gpu"].evictions += 1

    def _trim_to_threshold(self) -> None:
        threshold = self.cfg.adapters.lru_eviction_threshold
        for victim in self.forecasts.trim(self.gpu, self._in_use, self.slots.num_slots, threshold):
            self._evict_gpu(victim)
