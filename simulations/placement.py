"""Placement as the simulator calls it: Algorithm 2 from ``vajra.policies`` or a baseline.

The simulator's executors are ints and its adapters are ints; :class:`PolicyPlacement` turns them
into the ``executor_id`` strings and ``(tenant, digest)`` keys of :mod:`vajra.policies.placement`
and calls its index unchanged. The two baselines of the placement experiment live here, because
they are comparisons, not policies the cluster runs:

* :class:`LeastLoaded`: the executor with the fewest requests running and queued (ties: the one
  that reached that load first), O(1) per decision: executors sit in buckets by load, and a load moves one bucket at a time.
* :class:`RandomPlacement`: a uniformly random executor that is not full (seeded), O(1) expected.

Every placement answers None when no executor can take the request; the engine then waits
(bounded) and finally records a ``no_capacity`` error.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Protocol

from simulations.cluster import Executor
from vajra.policies.placement import (
    ExecutorState,
    PlacementIndex,
    PlacementWeights,
    Tier,
    is_eligible,
)

_TIERS = tuple(Tier)  # tier int -> Tier, without an enum call per residency change


class SimPlacement(Protocol):
    """What the engine asks of a placement."""

    def choose(self, adapter: int, tenant: int, now_ms: float) -> int | None:
        """The executor for a request, or None when none can take it."""

    def load_changed(self, ex: Executor) -> None:
        """``ex``'s running or queued count changed by one."""

    def residency_changed(self, ex: Executor, adapter: int, tier: int) -> None:
        """``adapter``'s fastest tier on ``ex`` is now ``tier``."""

    def residencies_changed(self, ex: Executor, changes: list[tuple[int, int]]) -> None:
        """:meth:`residency_changed` for each (adapter, tier) of ``changes``, in order."""

    def placed(self, adapter: int, tenant: int, ex: Executor, now_ms: float) -> None:
        """A request was sent to ``ex`` (for its adapter's affinity)."""

    def add_executor(self, ex: Executor) -> None:
        """``ex`` (the next index) joined: a GPU the provisioner started."""

    def remove_executor(self, ex: Executor) -> None:
        """``ex`` (idle) left: never chosen again."""


class LeastLoaded:
    """The least-loaded executor that is not full; O(1) per decision and per load change.

    Among equals, the executor that reached that load first wins (deterministic).
    """

    def __init__(self, executors: list[Executor]) -> None:
        self._executors = executors
        self._level = [ex.load for ex in executors]
        self._buckets: list[dict[int, None]] = [{} for _ in range(2)]
        for ex in executors:
            self._bucket(ex.load)[ex.index] = None
        self._min = min(self._level, default=0)

    def add_executor(self, ex: Executor) -> None:
        self._level.append(ex.load)
        self._bucket(ex.load)[ex.index] = None
        self._min = min(self._min, ex.load)

    def remove_executor(self, ex: Executor) -> None:
        self._buckets[self._level[ex.index]].pop(ex.index, None)

    def _bucket(self, level: int) -> dict[int, None]:
        while level >= len(self._buckets):
            self._buckets.append({})
        return self._buckets[level]

    def choose(self, adapter: int, tenant: int, now_ms: float) -> int | None:
        buckets = self._buckets
        level = self._min
        while level < len(buckets) and not buckets[level]:
            level += 1
        self._min = level
        if level >= len(buckets):
            return None
        best = next(iter(buckets[level]))
        return None if self._executors[best].full else best

    def load_changed(self, ex: Executor) -> None:
        old, new = self._level[ex.index], ex.load
        if old == new:
            return
        del self._buckets[old][ex.index]
        self._bucket(new)[ex.index] = None
        self._level[ex.index] = new
        if new < self._min:
            self._min = new

    def residency_changed(self, ex: Executor, adapter: int, tier: int) -> None:
        return None

    def residencies_changed(self, ex: Executor, changes: list[tuple[int, int]]) -> None:
        return None

    def placed(self, adapter: int, tenant: int, ex: Executor, now_ms: float) -> None:
        return None


class RandomPlacement:
    """A uniformly random executor that is not full; a bounded number of draws, then a scan."""

    def __init__(self, executors: list[Executor], seed: int) -> None:
        self._executors = executors  # the simulator's own list: an executor that joins is in it
        self._rng = random.Random(seed)
        self._gone: set[int] = set()

    def add_executor(self, ex: Executor) -> None:
        return None

    def remove_executor(self, ex: Executor) -> None:
        self._gone.add(ex.index)

    def choose(self, adapter: int, tenant: int, now_ms: float) -> int | None:
        n, gone = len(self._executors), self._gone
        for _ in range(8):
            i = self._rng.randrange(n)
            if not self._executors[i].full and i not in gone:
                return i
        free = [ex.index for ex in self._executors if not ex.full and ex.index not in gone]
        return self._rng.choice(free) if free else None

    def load_changed(self, ex: Executor) -> None:
        return None

    def residency_changed(self, ex: Executor, adapter: int, tier: int) -> None:
        return None

    def residencies_changed(self, ex: Executor, changes: list[tuple[int, int]]) -> None:
        return None

    def placed(self, adapter: int, tenant: int, ex: Executor, now_ms: float) -> None:
        return None


class PolicyPlacement:
    """Algorithm 2: :class:`vajra.policies.placement.PlacementIndex`, called unchanged.

    Executor ``i`` is ``"gpu-i"``; adapter ``a`` of tenant ``t`` is the key
    ``("tenant-t", "adapter-a")``. Each load change re-reports the executor's state (as its
    heartbeat would, but at once), each tier change its residency.
    """

    def __init__(
        self,
        executors: list[Executor],
        *,
        base_model: str,
        alpha: float,
        beta: float,
        gamma: float,
        tenant_of: Callable[[int], int] = int,
        load_step: int = 1,
    ) -> None:
        if load_step < 1:
            raise ValueError(f"load_step must be >= 1, got {load_step!r}")
        self._tenant_of = tenant_of
        self._step = load_step
        self._index = PlacementIndex(PlacementWeights(alpha, beta, gamma))
        self._base = base_model
        self._ids: list[str] = []
        self._by_id: dict[str, int] = {}
        self._keys: dict[int, tuple[str, str]] = {}
        self._tenants: dict[int, str] = {}
        self._states: list[ExecutorState] = []
        # what the index's heap entry of each executor was computed from: (load // step,
        # adapters in use // step, eligible)
        self._posted: list[tuple[int, int, bool]] = []
        for ex in executors:
            self.add_executor(ex)
        self.upserts = 0

    def add_executor(self, ex: Executor) -> None:
        eid = f"gpu-{ex.index}"
        self._ids.append(eid)
        self._by_id[eid] = ex.index
        state = ExecutorState(
            executor_id=eid,
            base_model=self._base,
            max_batch_size=ex.max_batch,
            max_queue=ex.max_queue,
            gpu_slots=ex.gpu_slots,
            gpu_slots_free=ex.gpu_slots,
        )
        self._states.append(state)
        self._index.upsert_executor(state)
        self._posted.append((0, 0, is_eligible(state, Tier.REMOTE)))

    def remove_executor(self, ex: Executor) -> None:
        self._index.remove_executor(self._ids[ex.index])

    def key(self, adapter: int, tenant: int) -> tuple[str, str]:
        key = self._keys.get(adapter)
        if key is None:
            key = self._keys[adapter] = (self.tenant(tenant), f"adapter-{adapter}")
        return key

    def tenant(self, tenant: int) -> str:
        name = self._tenants.get(tenant)
        if name is None:
            name = self._tenants[tenant] = f"tenant-{tenant}"
        return name

    def choose(self, adapter: int, tenant: int, now_ms: float) -> int | None:
        key = self._keys.get(adapter) or self.key(adapter, tenant)
        eid = self._index.choose_id(key, self._base, now_ms=now_ms)
        return None if eid is None else self._by_id[eid]

    def load_changed(self, ex: Executor) -> None:
        """Update ``ex``'s state in place; re-post it to the index's load heap when needed.

        The state object is the one the index holds, so holders and affinity executors are
        always scored on current figures. Only the heap entry that ranks the other executors
        (least loaded first) is refreshed, and with ``load_step`` > 1 only when the load or
        adapters in use cross a multiple of ``load_step`` or eligibility changes: between two
        refreshes the heap ranks ``ex`` by a load at most ``load_step`` - 1 off.
        """
        state = self._states[ex.index]
        state.inflight = running = ex.running
        state.queue_depth = queued = len(ex.queue)
        state.active_adapters = active = len(ex.in_use)
        free = ex.gpu_slots - len(ex.gpu)
        state.gpu_slots_free = free if free > 0 else 0
        step = self._step
        if step > 1:
            load = running + queued
            posted = self._posted[ex.index]
            mark = (load, active, is_eligible(state, Tier.REMOTE))
            if (
                mark[2] == posted[2]
                and load <= posted[0]
                and active <= posted[1]
                and posted[0] - load < step
                and posted[1] - active < step
            ):
                return  # less load than posted, by less than a step: the heap may lag
            self._posted[ex.index] = mark
        self.upserts += 1
        self._index.upsert_executor(state)

    def residency_changed(self, ex: Executor, adapter: int, tier: int) -> None:
        key = self._keys.get(adapter) or self.key(adapter, self._tenant_of(adapter))
        self._index.set_residency(self._ids[ex.index], key, _TIERS[tier])

    def residencies_changed(self, ex: Executor, changes: list[tuple[int, int]]) -> None:
        eid, keys, tiers = self._ids[ex.index], self._keys, _TIERS
        set_residency = self._index.set_residency
        for adapter, tier in changes:
            key = keys.get(adapter) or self.key(adapter, self._tenant_of(adapter))
            set_residency(eid, key, tiers[tier])

    def placed(self, adapter: int, tenant: int, ex: Executor, now_ms: float) -> None:
        key = self._keys.get(adapter) or self.key(adapter, tenant)
        self._index.note_placement(key, self._ids[ex.index], now_ms)
