"""The cluster's entities: executors with adapter tiers, as plain data plus the tier moves.

Each executor holds three least-recently-used tiers of adapters (GPU slots, pinned host memory,
local disk); the object store holds every adapter. Tiers are inclusive like a page cache: an
adapter loaded into GPU memory from the object store is also left in host memory and on disk,
and an eviction from one tier drops only that copy. Every adapter has the same size
(``cluster.adapter_bytes``), so byte budgets become entry counts.

Loads go through one copy channel per executor, one at a time: a load starts when the previous
one ends and takes ``bytes / bandwidth + latency`` of the tier it reads from.

Adapters are small ints here (the trace's adapter index); the policies see them as
``(tenant, digest)`` keys (see :mod:`simulations.engine`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from simulations.config import ClusterSection

GPU, HOST, DISK, REMOTE = 0, 1, 2, 3
TIER_NAMES = ("gpu", "host", "disk", "remote")


@dataclass(frozen=True, slots=True)
class TierTimes:
    """Milliseconds to bring one adapter into GPU memory from each tier (index GPU..REMOTE)."""

    load_ms: tuple[float, float, float, float]

    @classmethod
    def from_cluster(cls, c: ClusterSection) -> TierTimes:
        def ms(gbps: float, latency_ms: float) -> float:
            return c.adapter_bytes / (gbps * 1e6) + latency_ms

        return cls(
            (
                0.0,
                ms(c.host_gbps, c.host_latency_ms),
                ms(c.disk_gbps, c.disk_latency_ms),
                ms(c.remote_gbps, c.remote_latency_ms),
            )
        )


@dataclass(slots=True)
class Executor:
    """One GPU: its batch, its queue, its tiers and its counters. Plain data."""

    index: int
    gpu_slots: int
    host_slots: int
    disk_slots: int
    max_batch: int
    max_queue: int
    joined_ms: float = -math.inf  # when it started serving (provisioned ones: later than the rest)
    retired_ms: float = math.inf  # when a provisioned one left, idle (cluster.idle_stop_ms)
    idle_since_ms: float | None = None  # since when it has had no request (None: busy)
    running: int = 0
    queue: deque[tuple[int, float, int, int, int]] = field(default_factory=deque)
    gpu: dict[int, float] = field(
        default_factory=dict
    )  # adapter -> time its load completes; LRU order
    host: dict[int, None] = field(default_factory=dict)
    disk: dict[int, None] = field(default_factory=dict)
    in_use: dict[int, int] = field(default_factory=dict)  # adapter -> running requests
    load_free_ms: float = 0.0  # when the copy channel is next free
    busy_until_ms: float = 0.0
    busy_ms: float = 0.0
    loads: int = 0
    bytes_loaded: int = 0
    gpu_overflow: int = 0  # loads that found every slot in use (admitted past the slot count)
    served: set[int] = field(default_factory=set)  # distinct adapters served
    changes: list[tuple[int, int]] = field(
        default_factory=list
    )  # (adapter, new tier), drained by the engine
    # (executor, incoming adapter, now) -> the GPU victim, or None for LRU; set by a prefetch
    # policy with policy.eviction = "predicted" (simulations.prefetch)
    pick_victim: Callable[[Executor, int, float], int | None] | None = None

    @property
    def load(self) -> int:
        return self.running + len(self.queue)

    @property
    def full(self) -> bool:
        return self.load >= self.max_batch + self.max_queue

    def tier_of(self, adapter: int) -> int:
        """The fastest tier that holds ``adapter`` here (GPU counts once its load is issued)."""
        if adapter in self.gpu:
            return GPU
        if adapter in self.host:
            return HOST
        if adapter in self.disk:
            return DISK
        return REMOTE

    def touch(self, adapter: int) -> None:
        """Mark ``adapter`` most recently used in GPU memory."""
        self.gpu[adapter] = self.gpu.pop(adapter)

    def load_to_gpu(
        self, adapter: int, now_ms: float, times: TierTimes, nbytes: int, *, stretch: float = 1.0
    ) -> float:
        """Bring ``adapter`` into GPU memory through the copy channel; returns when it is ready.
        The tier's load time is multiplied by ``stretch`` (CPU contention, :mod:`simulations.host`).

        Evicts ``pick_victim``'s choice, else the least recently used idle adapter, when every
        slot is taken (it stays in host memory and on disk); when every resident adapter is in
        use the slot count is exceeded and counted in ``gpu_overflow`` rather than failing a
        request. Every tier change is appended to :attr:`changes` as (adapter, its new fastest
        tier) for the caller to report.
        """
        src = self.tier_of(adapter)
        if src == GPU:
            return self.gpu[adapter]
        ready = max(now_ms, self.load_free_ms) + times.load_ms[src] * stretch
        self.load_free_ms = ready
        self.loads += 1
        self.bytes_loaded += nbytes
        gpu, changes = self.gpu, self.changes
        pick = self.pick_victim
        full = len(gpu) >= self.gpu_slots
        v = pick(self, adapter, now_ms) if full and pick is not None else None
        if v is not None:
            del gpu[v]  # the prefetch policy's choice: an idle adapter
            changes.append((v, self._below_gpu(v)))
        elif full:
            in_use = self.in_use
            for victim in gpu:  # least recently used first
                if victim not in in_use:
                    del gpu[victim]
                    changes.append((victim, self._below_gpu(victim)))
                    break
            else:
                self.gpu_overflow += 1
        gpu[adapter] = ready
        changes.append((adapter, GPU))
        self._keep(self.host, adapter, self.host_slots)
        self._keep(self.disk, adapter, self.disk_slots)
        return ready

    def stage(self, adapter: int, tier: int) -> None:
        """Make sure ``adapter`` is held at ``tier`` (HOST or DISK) without touching the GPU."""
        before = self.tier_of(adapter)
        if tier == HOST:
            self._keep(self.host, adapter, self.host_slots)
        if tier in (HOST, DISK):
            self._keep(self.disk, adapter, self.disk_slots)
        if self.tier_of(adapter) != before:
            self.changes.append((adapter, self.tier_of(adapter)))

    def demote(self, adapter: int, tier: int) -> bool:
        """Drop ``adapter`` from the tiers faster than ``tier``; False when it is in use."""
        if adapter in self.in_use:
            return False
        if tier >= HOST:
            self.gpu.pop(adapter, None)
        if tier >= DISK:
            self.host.pop(adapter, None)
        if tier >= REMOTE:
            self.disk.pop(adapter, None)
        self.changes.append((adapter, self.tier_of(adapter)))
        return True

    def _below_gpu(self, adapter: int) -> int:
        return HOST if adapter in self.host else DISK if adapter in self.disk else REMOTE

    def _keep(self, tier: dict[int, None], adapter: int, slots: int) -> None:
        if slots <= 0:
            return
        if adapter in tier:
            del tier[adapter]
        elif len(tier) >= slots:
            victim = next(iter(tier))
            del tier[victim]
            if victim not in self.gpu:
                self.changes.append((victim, self.tier_of(victim)))
        tier[adapter] = None

    def mark_busy(self, start_ms: float, end_ms: float) -> None:
        """Add ``[start_ms, end_ms)`` to the executor's busy time, counting overlap once."""
        start = max(start_ms, self.busy_until_ms)
        if end_ms > start:
            self.busy_ms += end_ms - start
        if end_ms > self.busy_until_ms:
            self.busy_until_ms = end_ms


def build_executors(c: ClusterSection) -> list[Executor]:
    """``c.executors`` empty executors with the configured capacities."""
    return [new_executor(c, i) for i in range(c.executors)]


def new_executor(c: ClusterSection, index: int, joined_ms: float = -math.inf) -> Executor:
    """An empty executor with the configured capacities (``joined_ms``: when it serves from)."""
    return Executor(
        index=index,
        gpu_slots=c.gpu_slots,
        host_slots=c.host_bytes // c.adapter_bytes,
        disk_slots=c.disk_bytes // c.adapter_bytes,
        max_batch=c.max_batch_size,
        max_queue=c.max_queue,
        joined_ms=joined_ms,
        idle_since_ms=joined_ms,
    )
