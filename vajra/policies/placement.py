"""Placement of a request on an executor: the paper's Algorithm 2, with an index.

Score of a candidate executor ``e`` for a request of tenant ``t`` on adapter ``k``::

    score(e) = alpha * s_load(e) + beta * s_locality(e, k) + gamma * s_affinity(e, t)

* ``s_load`` (:func:`state_load_score`): 1.0 for an idle executor, falling with its occupancy
  (requests in flight plus queued, over batch plus queue capacity; weight 0.7) and with its
  adapter pressure (adapters held by running requests over its GPU slots; weight 0.3).
* ``s_locality``: by the tier that holds ``k`` on ``e`` (:data:`DEFAULT_LOCALITY`): GPU 1.0,
  host memory 0.6, local disk 0.3, only in the object store 0.0. The steps follow the load
  times: a GPU hit costs nothing, a host copy a PCIe transfer, a disk copy a read and the
  transfer, the object store a download on top.
* ``s_affinity``: the share of the tenant's last ``affinity_window`` placements (within
  ``affinity_ttl_ms``) that went to ``e`` (its KV prefixes and adapters are likely there).

Candidates: executors of the request's base model, not draining, not full (in flight plus
queued below batch plus queue capacity), with room for the adapter (it is already in GPU
memory there, or fewer adapters are held by running requests than there are GPU slots).

Index (:class:`PlacementIndex`). Executors are indexed by resident adapter key (which
executors hold ``k``, in which tier) and, per base model, kept in a max-heap by ``s_load``
with lazy invalidation (a version per executor; stale entries are dropped when met, and the
heap is rebuilt when stale entries outnumber live ones). Every executor that neither holds
``k`` nor appears in the tenant's affinity window scores ``alpha * s_load + beta *
locality[REMOTE]``, so the best of them is the least-loaded eligible one: the heap's top once
the (at most k) holders and affinity executors are skipped. A decision therefore costs
O(k log n) — k = executors holding the adapter + the tenant's affinity executors (at most
``affinity_window``), n = executors of the base model — never a scan of every executor, and it
picks exactly what a full scan would (ties: the smallest executor id).

The load-only :func:`choose_executor` / :class:`ExecutorLoad` stay for callers that have no
residency (the scheduler before an executor reports any).

Errors: methods raise ``ValueError`` for weights or windows out of range; an unknown executor
id in :meth:`PlacementIndex.set_residency` or :meth:`PlacementIndex.remove_executor` is
ignored (reports may race with an executor's removal). Pure code: no I/O, no clock.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import IntEnum

AdapterKey = tuple[str, str]  # (tenant_id, adapter digest)


class Tier(IntEnum):
    """Where an adapter sits on an executor, fastest first."""

    GPU = 0
    HOST = 1
    DISK = 2
    REMOTE = 3  # only in the object store


DEFAULT_LOCALITY: Mapping[Tier, float] = {
    Tier.GPU: 1.0,
    Tier.HOST: 0.6,
    Tier.DISK: 0.3,
    Tier.REMOTE: 0.0,
}


@dataclass(frozen=True, slots=True)
class PlacementWeights:
    alpha: float = 0.5  # load
    beta: float = 0.3  # adapter locality
    gamma: float = 0.2  # tenant affinity

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"placement weight {name} must be finite and >= 0, got {v!r}")


@dataclass(slots=True)
class ExecutorState:
    """What placement knows about one executor (its last report plus dispatches since)."""

    executor_id: str
    base_model: str
    inflight: int = 0  # running, or dispatched and not yet reported finished
    queue_depth: int = 0  # queued at the executor
    max_batch_size: int = 1
    max_queue: int = 0
    active_adapters: int = 0  # distinct adapters held by running requests (not evictable)
    gpu_slots_free: int = 0  # empty GPU adapter slots
    draining: bool = False
    gpu_slots: int = 100  # GPU adapter slots in all
    # Queued + running by the executor's own last report; when set, it (not inflight +
    # queue_depth, which counts dispatches the report has not seen) says when it is full.
    reported_load: int | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    executor_id: str
    score: float
    s_load: float
    s_locality: float
    s_affinity: float
    tier: Tier  # where the adapter sits on that executor now


def state_load_score(e: ExecutorState) -> float:
    """``s_load`` in [0, 1]: 1.0 idle, 0.0 with batch, queue and adapter slots all taken."""
    capacity = max(1, e.max_batch_size + e.max_queue)
    occupancy = min(1.0, max(0, e.inflight + e.queue_depth) / capacity)
    pressure = min(1.0, max(0, e.active_adapters) / max(1, e.gpu_slots))
    return max(0.0, 1.0 - 0.7 * occupancy - 0.3 * pressure)


def is_eligible(e: ExecutorState, tier: Tier) -> bool:
    """Whether ``e`` may take a request whose adapter sits in ``tier`` there."""
    load = e.inflight + e.queue_depth if e.reported_load is None else e.reported_load
    if e.draining or load >= e.max_batch_size + e.max_queue:
        return False
    return tier == Tier.GPU or e.gpu_slots_free > 0 or e.active_adapters < e.gpu_slots


class PlacementIndex:
    """Algorithm 2 over an index of executors; see the module docstring for the complexity."""

    def __init__(
        self,
        weights: PlacementWeights,
        *,
        affinity_window: int = 16,
        affinity_ttl_ms: float = 60_000.0,
        locality: Mapping[Tier, float] | None = None,
    ) -> None:
        if affinity_window < 1 or not affinity_ttl_ms > 0:
            raise ValueError("affinity_window must be >= 1 and affinity_ttl_ms > 0")
        self.weights = weights
        self.affinity_window = affinity_window
        self.affinity_ttl_ms = affinity_ttl_ms
        loc = dict(DEFAULT_LOCALITY)
        loc.update(locality or {})
        self.locality = loc
        self.executors: dict[str, ExecutorState] = {}
        self._version: dict[str, int] = {}
        self._heaps: dict[str, list[tuple[float, str, int]]] = {}  # base model -> (-s_load,..)
        self._live: Counter[str] = Counter()  # base model -> eligible executors in its heap
        self._holders: dict[AdapterKey, dict[str, Tier]] = {}
        self._held: dict[str, set[AdapterKey]] = {}
        self._recent: dict[str, deque[tuple[float, str]]] = {}
        self._recent_counts: dict[str, Counter[str]] = {}

    # --- state updates ----------------------------------------------------------------------

    def upsert_executor(self, state: ExecutorState) -> None:
        """Add an executor or replace its state (O(log n))."""
        old = self.executors.get(state.executor_id)
        if old is not None and old.base_model != state.base_model:
            self._forget_in_heap(old)
        elif old is not None and self._in_heap(old):
            self._live[old.base_model] -= 1
        self.executors[state.executor_id] = state
        version = self._version.get(state.executor_id, 0) + 1
        self._version[state.executor_id] = version
        self._held.setdefault(state.executor_id, set())
        if self._in_heap(state):
            heap = self._heaps.setdefault(state.base_model, [])
            heapq.heappush(heap, (-state_load_score(state), state.executor_id, version))
            self._live[state.base_model] += 1
            if len(heap) > 2 * self._live[state.base_model] + 64:
                self._rebuild(state.base_model)

    def remove_executor(self, executor_id: str) -> None:
        """Forget an executor, its residency and its place in affinity counts' candidates."""
        state = self.executors.pop(executor_id, None)
        if state is None:
            return
        if self._in_heap(state):
            self._live[state.base_model] -= 1
        self._version[executor_id] = self._version.get(executor_id, 0) + 1
        for key in self._held.pop(executor_id, set()):
            holders = self._holders.get(key)
            if holders is not None:
                holders.pop(executor_id, None)
                if not holders:
                    del self._holders[key]

    def set_residency(self, executor_id: str, key: AdapterKey, tier: Tier | None) -> None:
        """Record that ``key`` sits in ``tier`` on the executor (None or REMOTE: not there)."""
        if executor_id not in self.executors:
            return
        if tier is None or tier == Tier.REMOTE:
            holders = self._holders.get(key)
            if holders is not None and holders.pop(executor_id, None) is not None:
                self._held[executor_id].discard(key)
                if not holders:
                    del self._holders[key]
            return
        self._holders.setdefault(key, {})[executor_id] = Tier(tier)
        self._held[executor_id].add(key)

    def residency(self, executor_id: str) -> dict[AdapterKey, Tier]:
        """Every key recorded on ``executor_id`` and its tier."""
        return {k: self._holders[k][executor_id] for k in self._held.get(executor_id, ())}

    def holders(self, key: AdapterKey) -> dict[str, Tier]:
        """Executors holding ``key`` and the tier it sits in on each."""
        return dict(self._holders.get(key, {}))

    def note_placement(self, tenant_id: str, executor_id: str, now_ms: float) -> None:
        """Remember a placement for the tenant's affinity (O(1) amortised)."""
        window = self._recent.setdefault(tenant_id, deque())
        counts = self._recent_counts.setdefault(tenant_id, Counter())
        window.append((now_ms, executor_id))
        counts[executor_id] += 1
        if len(window) > self.affinity_window:
            _, old = window.popleft()
            self._drop_count(counts, old)
        self._expire(tenant_id, now_ms)

    # --- decisions --------------------------------------------------------------------------

    def affinity(self, tenant_id: str, executor_id: str, now_ms: float) -> float:
        self._expire(tenant_id, now_ms)
        window = self._recent.get(tenant_id)
        if not window:
            return 0.0
        return self._recent_counts[tenant_id][executor_id] / len(window)

    def score(
        self, state: ExecutorState, tier: Tier, affinity: float
    ) -> tuple[float, float, float, float]:
        """(score, s_load, s_locality, s_affinity) of one candidate."""
        w = self.weights
        s_load = state_load_score(state)
        s_loc = self.locality[tier]
        return (w.alpha * s_load + w.beta * s_loc + w.gamma * affinity, s_load, s_loc, affinity)

    def choose(
        self, tenant_id: str, key: AdapterKey, base_model: str, *, now_ms: float
    ) -> Placement | None:
        """The best executor for the request, or None when no candidate fits (provisioning)."""
        self._expire(tenant_id, now_ms)
        holders = self._holders.get(key, {})
        counts = self._recent_counts.get(tenant_id)
        window = self._recent.get(tenant_id)
        special: set[str] = set(holders)
        if counts:
            special.update(counts)
        best: tuple[float, str] | None = None
        best_p: Placement | None = None
        for eid in special:
            state = self.executors.get(eid)
            if state is None or state.base_model != base_model:
                continue
            tier = holders.get(eid, Tier.REMOTE)
            if not is_eligible(state, tier):
                continue
            aff = counts[eid] / len(window) if counts and window else 0.0
            total, s_load, s_loc, s_aff = self.score(state, tier, aff)
            if best is None or (-total, eid) < best:
                best, best_p = (-total, eid), Placement(eid, total, s_load, s_loc, s_aff, tier)
        other = self._least_loaded(base_model, skip=special)
        if other is not None:
            total, s_load, s_loc, s_aff = self.score(other, Tier.REMOTE, 0.0)
            if best is None or (-total, other.executor_id) < best:
                best_p = Placement(other.executor_id, total, s_load, s_loc, s_aff, Tier.REMOTE)
        return best_p

    # --- internals --------------------------------------------------------------------------

    def _in_heap(self, state: ExecutorState) -> bool:
        """Whether ``state`` may take a request for an adapter it does not hold."""
        return is_eligible(state, Tier.REMOTE)

    def _forget_in_heap(self, old: ExecutorState) -> None:
        if self._in_heap(old):
            self._live[old.base_model] -= 1

    def _valid(self, entry: tuple[float, str, int], base_model: str) -> bool:
        _, eid, version = entry
        state = self.executors.get(eid)
        return (
            state is not None
            and self._version.get(eid) == version
            and state.base_model == base_model
        )

    def _least_loaded(self, base_model: str, *, skip: set[str]) -> ExecutorState | None:
        """The eligible executor with the highest ``s_load`` not in ``skip`` (O(|skip| log n))."""
        heap = self._heaps.get(base_model)
        if not heap:
            return None
        popped: list[tuple[float, str, int]] = []
        found: ExecutorState | None = None
        while heap:
            entry = heap[0]
            if not self._valid(entry, base_model):
                heapq.heappop(heap)  # stale: dropped for good
                continue
            if entry[1] in skip:
                popped.append(heapq.heappop(heap))
                continue
            found = self.executors[entry[1]]
            break
        for entry in popped:
            heapq.heappush(heap, entry)
        return found

    def _rebuild(self, base_model: str) -> None:
        heap = [e for e in self._heaps.get(base_model, []) if self._valid(e, base_model)]
        heapq.heapify(heap)
        self._heaps[base_model] = heap

    def _expire(self, tenant_id: str, now_ms: float) -> None:
        window = self._recent.get(tenant_id)
        if not window:
            return
        counts = self._recent_counts[tenant_id]
        horizon = now_ms - self.affinity_ttl_ms
        while window and window[0][0] < horizon:
            _, old = window.popleft()
            self._drop_count(counts, old)
        if not window:
            del self._recent[tenant_id]
            del self._recent_counts[tenant_id]

    @staticmethod
    def _drop_count(counts: Counter[str], executor_id: str) -> None:
        counts[executor_id] -= 1
        if counts[executor_id] <= 0:
            del counts[executor_id]


# --- load-only placement (kept for callers without residency) ------------------------------


@dataclass(frozen=True, slots=True)
class ExecutorLoad:
    """What load-only placement needs to know about one executor."""

    executor_id: str
    inflight: int  # requests dispatched to it and not yet reported finished (lags a report)
    max_batch_size: int
    max_queue: int
    draining: bool = False
    reported_load: int = 0  # queued + running at its last report


def load_score(e: ExecutorLoad) -> float:
    """1.0 for an idle executor, falling to 0.0 when batch and queue are full."""
    capacity = max(1, e.max_batch_size + e.max_queue)
    return max(0.0, 1.0 - e.inflight / capacity)


def is_full(e: ExecutorLoad) -> bool:
    """Full by its own last report; bursts between reports are bounded by the executor's queue."""
    return e.reported_load >= e.max_batch_size + e.max_queue


def choose_executor(candidates: Iterable[ExecutorLoad]) -> ExecutorLoad | None:
    """The best executor for a request, or None when none can take it (all full or draining)."""
    best: ExecutorLoad | None = None
    best_key: tuple[float, int, str] | None = None
    for e in candidates:
        if e.draining or is_full(e):
            continue
        key = (-load_score(e), e.inflight, e.executor_id)
        if best_key is None or key < best_key:
            best, best_key = e, key
    return best
