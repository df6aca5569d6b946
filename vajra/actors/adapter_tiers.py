"""The executor's adapter tiers: object store → local disk → pinned host memory → GPU pool.

Every tier is bounded and evicts least-recently-used, and the GPU tier never evicts an adapter
that a running request holds (a reference count per adapter, taken at admission and released
when the request ends). Adapters are addressed by content digest, so a new version (a new
digest) loads into a free slot while requests on the old one finish on its old slot — the
atomic swap — and a digest that does not match its bytes is refused as corrupt.

* disk: ``<cache_dir>/<digest>/{adapter_config.json, adapter_model.safetensors}``, bounded in
  bytes (``adapters.disk_cache_bytes``), LRU; found again after a restart.
* host: one buffer allocated once at start (pinned when CUDA is present: pinning is slow), cut
  into fixed slots per rank class, so caching never fragments it (``adapters.host_cache_bytes``).
* GPU: the engine's :class:`~vajra.gpu.lora.LoraPool` (``adapters.max_vram_adapters`` slots);
  past ``adapters.lru_eviction_threshold`` of its slots in use, unreferenced adapters are
  evicted down to the threshold.

Concurrency: one task per digest loads it (single flight); later callers wait for that load.
File reads, hashing, validation and packing run in worker threads; copies into the GPU pool run
under the copy limiter. Counters and load-time histograms per tier are in :attr:`stats`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trio

from vajra.adapters.format import BaseModelSpec, InvalidAdapter, validate_adapter
from vajra.config import VajraConfig
from vajra.errors import OverloadedError, VajraError
from vajra.gpu.lora.pool import HostAdapter, LoraPool, PoolFull, pack_adapter, read_adapter_tensors
from vajra.storage import ObjectStore
from vajra.storage.adapters import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, aget_adapter_objects

log = logging.getLogger("vajra.executor.tiers")

TIERS = ("gpu", "host", "disk", "store")
#: Upper bounds (ms) of the load-time histogram buckets.
LOAD_MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_ms: Counter[float] = field(default_factory=Counter)  # bucket upper bound -> count
    load_ms_sum: float = 0.0

    def observe(self, ms: float) -> None:
        self.load_ms[next(b for b in LOAD_MS_BUCKETS if ms <= b)] += 1
        self.load_ms_sum += ms


class HostSlab:
    """Host memory for packed adapters, allocated once and cut into fixed slots per rank class.

    A cached adapter takes a slot of the smallest class that fits; a full class evicts its
    least-recently-used entry. Nothing is allocated (or pinned) after start.
    """

    def __init__(
        self,
        rank_classes: tuple[int, ...],
        unit_numel: int,
        capacity_bytes: int,
        dtype: torch.dtype,
    ) -> None:
        element = torch.empty((), dtype=dtype).element_size()
        per_class = capacity_bytes // max(1, len(rank_classes))
        self.classes: list[tuple[int, torch.Tensor]] = []
        pin = torch.cuda.is_available()
        for rank in rank_classes:
            slots = max(1, per_class // (rank * unit_numel * element))
            buf = torch.empty((slots, rank * unit_numel), dtype=dtype, pin_memory=pin)
            self.classes.append((rank, buf))
        self.entries: OrderedDict[str, tuple[HostAdapter, int, int]] = OrderedDict()
        self._free: list[list[int]] = [list(range(buf.shape[0])) for _, buf in self.classes]
        self.capacity_bytes = sum(b.numel() * b.element_size() for _, b in self.classes)

    def get(self, digest: str) -> HostAdapter | None:
        hit = self.entries.get(digest)
        if hit is None:
            return None
        self.entries.move_to_end(digest)
        return hit[0]

    def reserve(self, digest: str, rank: int) -> tuple[torch.Tensor, int, int]:
        """A slot buffer for an adapter of ``rank`` (evicting LRU of that class if needed)."""
        for c, (class_rank, buf) in enumerate(self.classes):
            if class_rank < rank:
                continue
            if not self._free[c]:
                victim = next((d for d, (_, vc, _) in self.entries.items() if vc == c), None)
                if victim is None:
                    continue
                self.drop(victim)
            local = self._free[c].pop()
            return buf[local], c, local
        raise InvalidAdapter(f"adapter rank {rank} exceeds the largest host slot class")

    def put(self, digest: str, host: HostAdapter, c: int, local: int) -> None:
        self.entries[digest] = (host, c, local)

    def release_reservation(self, c: int, local: int) -> None:
        self._free[c].append(local)

    def drop(self, digest: str) -> bool:
        hit = self.entries.pop(digest, None)
        if hit is None:
            return False
        _, c, local = hit
        self._free[c].append(local)
        return True


class DiskCache:
    """The local-disk tier: adapter files by digest, bounded in bytes, least-recently-used out."""

    def __init__(self, root: Path, capacity_bytes: int) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        root.mkdir(parents=True, exist_ok=True)
        self.entries: OrderedDict[str, int] = OrderedDict()
        found = []
        for d in root.iterdir():
            weights = d / ADAPTER_WEIGHTS_FILE
            config = d / ADAPTER_CONFIG_FILE
            if d.is_dir() and weights.exists() and config.exists():
                found.append(
                    (
                        weights.stat().st_mtime,
                        d.name,
                        weights.stat().st_size + config.stat().st_size,
                    )
                )
        for _, digest, size in sorted(found):
            self.entries[digest] = size
        self.used_bytes = sum(self.entries.values())

    def read(self, digest: str) -> tuple[bytes, bytes] | None:
        if digest not in self.entries:
            return None
        d = self.root / digest
        try:
            data = (d / ADAPTER_CONFIG_FILE).read_bytes(), (d / ADAPTER_WEIGHTS_FILE).read_bytes()
        except FileNotFoundError:
            self.forget(digest)
            return None
        self.entries.move_to_end(digest)
        return data

    def write(self, digest: str, config: bytes, weights: bytes) -> None:
        size = len(config) + len(weights)
        if size > self.capacity_bytes:
            return
        while self.used_bytes + size > self.capacity_bytes and self.entries:
            self.forget(next(iter(self.entries)))
        d = self.root / digest
        tmp = self.root / f".{digest}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / ADAPTER_CONFIG_FILE).write_bytes(config)
        (tmp / ADAPTER_WEIGHTS_FILE).write_bytes(weights)
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
        self.entries[digest] = size
        self.used_bytes += size

    def forget(self, digest: str) -> None:
        size = self.entries.pop(digest, None)
        if size is not None:
            self.used_bytes -= size
        shutil.rmtree(self.root / digest, ignore_errors=True)


class AdapterTiers:
    """Moves adapters between tiers for one executor; see the module docstring."""

    def __init__(
        self,
        cfg: VajraConfig,
        pool: LoraPool,
        base: BaseModelSpec,
        store: ObjectStore,
        *,
        gpu_limiter: trio.CapacityLimiter,
    ) -> None:
        a = cfg.adapters
        self.cfg = cfg
        self.pool = pool
        self.base = base
        self.store = store
        self._gpu_limiter = gpu_limiter
        self._io = trio.CapacityLimiter(4)
        cache_dir = (
            Path(a.cache_dir).expanduser()
            if a.cache_dir
            else cfg.cluster.home_path / "cache" / "adapters"
        )
        self.disk = DiskCache(cache_dir, a.disk_cache_bytes)
        self.host = HostSlab(
            pool.rank_classes, pool.layout.unit_numel, a.host_cache_bytes, pool.dtype
        )
        self.gpu: OrderedDict[str, int] = OrderedDict()  # digest -> slot, least recent first
        self.refs: Counter[str] = Counter()
        self.stats: dict[str, TierStats] = {t: TierStats() for t in TIERS}
        self._loading: dict[str, trio.Event] = {}
        self._failures: dict[str, VajraError] = {}

    async def aclose(self) -> None:
        """Release the object store's connections (bounded in time, even when cancelled)."""
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            await trio.to_thread.run_sync(self.store.close)

    # --- the request path -----------------------------------------------------------------

    async def acquire(self, digest: str, object_key: str) -> int:
        """Make ``digest`` resident on the GPU and hold it there; returns its pool slot.

        Every :meth:`acquire` must be matched by one :meth:`release`. Raises a VajraError
        (NotFoundError, UnavailableError, InvalidAdapter for corrupt files, OverloadedError
        when every slot is held by running requests).
        """
        while True:
            slot = self.gpu.get(digest)
            if slot is not None:
                self.stats["gpu"].hits += 1
                self.refs[digest] += 1
                self.gpu.move_to_end(digest)
                return slot
            loading = self._loading.get(digest)
            if loading is not None:
                await loading.wait()
                failure = self._failures.pop(digest, None)
                if failure is not None and digest not in self.gpu:
                    raise failure
                continue
            self.stats["gpu"].misses += 1
            await self._load(digest, object_key, to_gpu=True)

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
        elif digest not in self.gpu and self.host.get(digest) is None:
            await self._load(digest, object_key, to_gpu=False, to_host=tier == "host")

    def demote(self, digest: str, tier: str) -> None:
        """Drop an adapter from ``tier`` and every tier above it (a held GPU copy stays)."""
        if tier not in ("gpu", "host", "disk"):
            raise InvalidAdapter(f"cannot demote from tier {tier!r}")
        if digest in self.gpu and not self.refs.get(digest):
            self._evict_gpu(digest)
        if tier in ("host", "disk"):
            self.host.drop(digest)
        if tier == "disk":
            self.disk.forget(digest)

    # --- loading --------------------------------------------------------------------------

    async def _load(
        self, digest: str, object_key: str, *, to_gpu: bool, to_host: bool = True
    ) -> None:
        done = self._loading[digest] = trio.Event()
        try:
            host = self.host.get(digest)
            if host is None:
                self.stats["host"].misses += 1
                config, weights = await self._bytes(digest, object_key)
                if not (to_gpu or to_host):
                    return
                host = await self._pack(digest, config, weights)
            else:
                self.stats["host"].hits += 1
            if to_gpu:
                await self._to_gpu(digest, host)
        except VajraError as exc:
            self._failures[digest] = exc
            raise
        finally:
            del self._loading[digest]
            done.set()

    async def _bytes(self, digest: str, object_key: str) -> tuple[bytes, bytes]:
        t0 = time.perf_counter()
        async with self._io:
            data = await trio.to_thread.run_sync(self.disk.read, digest)
        if data is not None:
            self.stats["disk"].hits += 1
            self.stats["disk"].observe((time.perf_counter() - t0) * 1e3)
            if await trio.to_thread.run_sync(_digest_of, *data) == digest:
                return data
            log.error("disk copy of adapter %s is corrupt; fetching it again", digest)
            self.disk.forget(digest)
        self.stats["disk"].misses += 1
        t0 = time.perf_counter()
        config, weights = await aget_adapter_objects(self.store, object_key)
        self.stats["store"].observe((time.perf_counter() - t0) * 1e3)
        if await trio.to_thread.run_sync(_digest_of, config, weights) != digest:
            raise InvalidAdapter(f"adapter files under {object_key!r} are corrupt: digest mismatch")
        async with self._io:
            await trio.to_thread.run_sync(self.disk.write, digest, config, weights)
        return config, weights

    async def _pack(self, digest: str, config: bytes, weights: bytes) -> HostAdapter:
        t0 = time.perf_counter()
        a = self.cfg.adapters

        def validate_and_pack() -> HostAdapter:
            manifest = validate_adapter(
                config, weights, self.base, max_rank=a.max_rank, max_bytes=a.max_adapter_bytes
            )
            buf, c, local = self.host.reserve(digest, manifest.rank)
            try:
                host = pack_adapter(
                    manifest,
                    read_adapter_tensors(weights),
                    self.pool.layout,
                    dtype=self.pool.dtype,
                    out=buf,
                )
            except BaseException:
                self.host.release_reservation(c, local)
                raise
            self.host.put(digest, host, c, local)
            return host

        async with self._io:
            host = await trio.to_thread.run_sync(validate_and_pack)
        self.stats["host"].observe((time.perf_counter() - t0) * 1e3)
        return host

    async def _to_gpu(self, digest: str, host: HostAdapter) -> None:
        t0 = time.perf_counter()
        while True:
            try:
                async with self._gpu_limiter:
                    slot = await trio.to_thread.run_sync(self.pool.load, host)
                break
            except PoolFull:
                if not self._evict_lru():
                    raise OverloadedError(
                        "every adapter slot on this executor is in use by running requests; retry"
                    ) from None
        self.gpu[digest] = slot
        self.stats["gpu"].observe((time.perf_counter() - t0) * 1e3)
        self._trim_to_threshold()

    def _evict_lru(self) -> bool:
        victim = next((d for d in self.gpu if not self.refs.get(d)), None)
        if victim is None:
            return False
        self._evict_gpu(victim)
        return True

    def _evict_gpu(self, digest: str) -> None:
        slot = self.gpu.pop(digest)
        self.pool.free(slot)
        self.stats["gpu"].evictions += 1

    def _trim_to_threshold(self) -> None:
        limit = int(self.pool.num_slots * self.cfg.adapters.lru_eviction_threshold)
        while len(self.gpu) > max(1, limit) and self._evict_lru():
            pass


def _digest_of(config: bytes, weights: bytes) -> str:
    h = hashlib.sha256()
    h.update(config)
    h.update(weights)
    return h.hexdigest()
