# Over 400 lines: Algorithm 2, its index and its load order are one unit, kept together for the
# inlined hot path (the simulator calls it several times a request).
"""Placement of a request on an executor: the paper's Algorithm 2, with an index.

Score of a candidate executor ``e`` for a request of tenant ``t`` on adapter ``k`` (the key
``(t, digest)``; the base model alone: ``(t, "")``)::

    score(e) = alpha * s_load(e) + beta * s_locality(e, k) + gamma * s_affinity(e, k)

* ``s_load`` (:func:`state_load_score`): 1.0 for an idle executor, falling with its occupancy
  (requests in flight plus queued, over batch plus queue capacity; weight 0.7) and with its
  adapter pressure (adapters held by running requests over its GPU slots; weight 0.3).
* ``s_locality``: by the tier that holds ``k`` on ``e`` (:data:`DEFAULT_LOCALITY`): GPU 1.0,
  host memory 0.6, local disk 0.3, only in the object store 0.0. The steps follow the load
  times: a GPU hit costs nothing, a host copy a PCIe transfer, a disk copy a read and the
  transfer, the object store a download on top.
* ``s_affinity``: the share of the tenant's last ``affinity_window`` placements of ``k``
  (within ``affinity_ttl_ms``) that went to ``e``: where its prefix-cache blocks are (they are
  per adapter version, so a tenant's requests on another adapter share none), even when
  several executors hold the adapter. Keyed by the tenant's adapter, not by the tenant alone:
  a tenant-wide window pulls every adapter of a tenant with many adapters onto the executor
  it used last, and leaves the other executors' GPU memory unused (measured in
  docs/simulations.md, section 5: 219 cold starts against 181 on the agreement trace, whose
  one tenant owns 300 adapters; the fewest possible there is 180).

Candidates: executors of the request's base model, not draining, not full (in flight plus
queued below batch plus queue capacity), with room for the adapter (it is already in GPU
memory there, or fewer adapters are held by running requests than there are GPU slots).

Index (:class:`PlacementIndex`). Executors are indexed by resident adapter key (which
executors hold ``k``, in which tier) and, per base model, ordered by ``s_load``: buckets keyed by
the exact ``s_load`` value, each a heap of executor ids, under a heap of the bucket keys, both
with lazy deletion (an entry whose executor has since moved bucket is dropped when met; all
buckets are rebuilt when stale entries outnumber live ones). Re-posting an executor whose
``s_load`` did not change pushes nothing, O(1); a change costs a push, O(log n). Every executor
that neither holds ``k`` nor appears in ``k``'s affinity window scores ``alpha * s_load +
beta * locality[REMOTE]``, so the best of them is the least-loaded eligible one: the top of the
best bucket once the (at most k) holders and affinity executors are skipped. A decision
therefore costs O(k log n) amortised — k = executors holding the adapter + the adapter's
affinity executors (at most ``affinity_window``), n = executors of the base model — never a
scan of every executor, and it picks exactly what a full scan would (ties: the smallest
executor id; with ``alpha = 0`` every executor that neither holds ``k`` nor has affinity
scores the same, and of those the least-loaded one is taken, ties again to the smallest id).

The load-only :func:`choose_executor` / :class:`ExecutorLoad` stay for callers that have no
residency (the scheduler before an executor reports any).

Errors: methods raise ``ValueError`` for weights or windows out of range and for a tier that is
not a :class:`Tier` value; an unknown executor id in :meth:`PlacementIndex.set_residency` or :meth:`PlacementIndex.remove_executor` is
ignored (reports may race with an executor's removal). Pure code: no I/O, no clock.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Container, Iterable, Mapping
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
    gamma: float = 0.2  # affinity: the tenant's recent placements of the adapter

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
    # Queued + running by the executor's own last report. When set, an executor is full when
    # this or ``inflight`` reaches batch plus queue: a report does not see the dispatches
    # since, and ``inflight`` does not see what finished since the report, so the larger of
    # the two never sends more than the executor can hold (it would refuse: ``overloaded``).
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
    queued = e.inflight + e.queue_depth
    load = queued if e.reported_load is None else max(e.inflight, e.reported_load)
    if e.draining or load >= e.max_batch_size + e.max_queue:
        return False
    return tier == Tier.GPU or e.gpu_slots_free > 0 or e.active_adapters < e.gpu_slots


class _LoadOrder:
    """The eligible executors of one base model, best ``s_load`` first (ties: smallest id).

    Buckets keyed by the exact ``s_load`` float, each a heap of executor ids, and a heap of the
    bucket keys. Both are lazy: an id whose posted score is no longer its bucket's key is a
    stale entry, dropped when met at a bucket's top; a bucket stays (and its key in the key
    heap) until it is met empty there. Re-posting an unchanged score costs one dict lookup;
    a change costs one push (O(log b), b the bucket's size) and, for a new bucket, one push
    on the key heap. Stale entries are bounded: past ``2 x live + 64`` entries every bucket is
    rebuilt from :attr:`score` (O(n log n) per n posts).
    """

    __slots__ = ("buckets", "entries", "keys", "score")

    def __init__(self) -> None:
        self.score: dict[str, float] = {}  # eligible executor -> its posted s_load
        self.buckets: dict[float, list[str]] = {}  # s_load -> heap of ids (may hold stale ids)
        self.keys: list[float] = []  # heap of -s_load, one per bucket in ``buckets``
        self.entries = 0  # ids in all buckets, stale ones included

    def post(self, eid: str, s_load: float) -> None:
        """Post ``eid`` at ``s_load`` (inlined in :meth:`PlacementIndex.upsert_executor`)."""
        if self.score.get(eid) == s_load:
            return
        self.score[eid] = s_load
        bucket = self.buckets.get(s_load)
        if bucket is None:
            self.buckets[s_load] = [eid]
            heapq.heappush(self.keys, -s_load)
        else:
            heapq.heappush(bucket, eid)
        self.entries += 1
        if self.entries > 2 * len(self.score) + 64:
            self.rebuild()

    def drop(self, eid: str) -> None:
        self.score.pop(eid, None)

    def best(self, skip: Container[str], skip_too: Container[str]) -> tuple[str, float] | None:
        """The id and ``s_load`` of the best executor in neither ``skip`` nor ``skip_too``;
        O((|skip| + |skip_too| + stale) log n)."""
        keys, buckets, score = self.keys, self.buckets, self.score
        pop, push = heapq.heappop, heapq.heappush
        passed: list[float] = []  # keys whose buckets hold only skipped ids
        found: tuple[str, float] | None = None
        while keys:
            s_load = -keys[0]
            bucket = buckets[s_load]
            skipped: list[str] = []
            while bucket:
                eid = bucket[0]
                if score.get(eid) != s_load:
                    pop(bucket)  # stale: dropped for good
                    self.entries -= 1
                elif eid in skip or eid in skip_too:
                    skipped.append(pop(bucket))
                else:
                    found = (eid, s_load)
                    break
            for eid in skipped:
                push(bucket, eid)
            if found is not None:
                break
            if bucket:
                passed.append(pop(keys))
            else:
                pop(keys)
                del buckets[s_load]
        for key in passed:
            push(keys, key)
        return found

    def rebuild(self) -> None:
        buckets: dict[float, list[str]] = {}
        for eid, s_load in self.score.items():
            bucket = buckets.get(s_load)
            if bucket is None:
                buckets[s_load] = [eid]
            else:
                bucket.append(eid)
        for bucket in buckets.values():
            bucket.sort()  # a sorted list is a heap
        self.buckets = buckets
        self.keys = sorted(-s for s in buckets)
        self.entries = len(self.score)


_REMOTE = Tier.REMOTE
_NO_HOLDERS: Mapping[str, Tier] = {}
_NO_COUNTS: Mapping[str, int] = {}


class PlacementIndex:
    """Algorithm 2 over an index of executors; see the module docstring for the complexity.

    A state changed in place must be passed to :meth:`upsert_executor` again before the next
    :meth:`choose` (the load order keeps the score it was posted with).
    """

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
        # executor -> the base model it is indexed under and that model's load order
        self._slot: dict[str, tuple[str, _LoadOrder]] = {}
        self._orders: dict[str, _LoadOrder] = {}  # base model -> its eligible executors
        self._holders: dict[AdapterKey, dict[str, Tier]] = {}
        self._held: dict[str, set[AdapterKey]] = {}
        # adapter key -> (its last placements: (ms, executor), oldest first; executor -> count)
        self._recent: dict[AdapterKey, tuple[deque[tuple[float, str]], dict[str, int]]] = {}

    # --- state updates ----------------------------------------------------------------------

    def upsert_executor(self, state: ExecutorState) -> None:
        """Add an executor or replace its state (O(1) if its ``s_load`` is unchanged, else
        O(log n))."""
        eid, base = state.executor_id, state.base_model
        slot = self._slot.get(eid)
        if slot is None or slot[0] != base:
            if slot is not None:
                slot[1].drop(eid)
            order = self._orders.get(base)
            if order is None:
                order = self._orders[base] = _LoadOrder()
            self._slot[eid] = (base, order)
            if eid not in self._held:
                self._held[eid] = set()
        else:
            order = slot[1]
        self.executors[eid] = state
        # is_eligible(state, Tier.REMOTE) and state_load_score(state), inlined (same formulas)
        queued = state.inflight + state.queue_depth
        capacity = state.max_batch_size + state.max_queue
        load = queued if state.reported_load is None else max(state.inflight, state.reported_load)
        active, slots = state.active_adapters, state.gpu_slots
        if state.draining or load >= capacity or (state.gpu_slots_free <= 0 and active >= slots):
            order.drop(eid)
            return
        occupancy = (queued if queued > 0 else 0) / (capacity if capacity > 1 else 1)
        if occupancy > 1.0:
            occupancy = 1.0
        pressure = (active if active > 0 else 0) / (slots if slots > 1 else 1)
        if pressure > 1.0:
            pressure = 1.0
        s_load = 1.0 - 0.7 * occupancy - 0.3 * pressure
        if not s_load > 0.0:
            s_load = 0.0
        # order.post(eid, s_load), inlined
        score = order.score
        if score.get(eid) == s_load:
            return
        score[eid] = s_load
        bucket = order.buckets.get(s_load)
        if bucket is None:
            order.buckets[s_load] = [eid]
            heapq.heappush(order.keys, -s_load)
        else:
            heapq.heappush(bucket, eid)
        order.entries += 1
        if order.entries > 2 * len(score) + 64:
            order.rebuild()

    def remove_executor(self, executor_id: str) -> None:
        """Forget an executor, its residency and its place in affinity counts' candidates."""
        state = self.executors.pop(executor_id, None)
        if state is None:
            return
        slot = self._slot.pop(executor_id, None)
        if slot is not None:
            slot[1].drop(executor_id)
        for key in self._held.pop(executor_id, set()):
            holders = self._holders.get(key)
            if holders is not None:
                holders.pop(executor_id, None)
                if not holders:
                    del self._holders[key]

    def set_residency(self, executor_id: str, key: AdapterKey, tier: Tier | None) -> None:
        """Record that ``key`` sits in ``tier`` on the executor (None or REMOTE: not there).

        Raises ``ValueError`` for a tier that is not a :class:`Tier` value."""
        held = self._held.get(executor_id)
        if held is None:
            return
        if tier is None or tier == _REMOTE:
            holders = self._holders.get(key)
            if holders is not None and holders.pop(executor_id, None) is not None:
                held.discard(key)
                if not holders:
                    del self._holders[key]
            return
        if type(tier) is not Tier:
            tier = Tier(tier)
        holders = self._holders.get(key)
        if holders is None:
            self._holders[key] = {executor_id: tier}
        else:
            holders[executor_id] = tier
        held.add(key)

    def residency(self, executor_id: str) -> dict[AdapterKey, Tier]:
        """Every key recorded on ``executor_id`` and its tier."""
        return {k: self._holders[k][executor_id] for k in self._held.get(executor_id, ())}

    def holders(self, key: AdapterKey) -> dict[str, Tier]:
        """Executors holding ``key`` and the tier it sits in on each."""
        return dict(self._holders.get(key, {}))

    def note_placement(self, key: AdapterKey, executor_id: str, now_ms: float) -> None:
        """Remember a placement of ``key`` for its affinity (O(1) amortised)."""
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent[key] = (deque(), {})
        window, counts = recent
        window.append((now_ms, executor_id))
        counts[executor_id] = counts.get(executor_id, 0) + 1
        if len(window) > self.affinity_window:
            _, old = window.popleft()
            left = counts[old] - 1
            if left > 0:
                counts[old] = left
            else:
                del counts[old]
        if window[0][0] < now_ms - self.affinity_ttl_ms:
            self._expire(key, now_ms)

    # --- decisions --------------------------------------------------------------------------

    def affinity(self, key: AdapterKey, executor_id: str, now_ms: float) -> float:
        """``s_affinity``: the share of ``key``'s recent placements that went to the executor."""
        self._expire(key, now_ms)
        recent = self._recent.get(key)
        if recent is None:
            return 0.0
        return recent[1].get(executor_id, 0) / len(recent[0])

    def score(
        self, state: ExecutorState, tier: Tier, affinity: float
    ) -> tuple[float, float, float, float]:
        """(score, s_load, s_locality, s_affinity) of one candidate."""
        w = self.weights
        s_load = state_load_score(state)
        s_loc = self.locality[tier]
        return (w.alpha * s_load + w.beta * s_loc + w.gamma * affinity, s_load, s_loc, affinity)

    def choose(self, key: AdapterKey, base_model: str, *, now_ms: float) -> Placement | None:
        """The best executor for a request of ``key``, or None when no candidate fits
        (provisioning)."""
        best = self._decide(key, base_model, now_ms)
        return None if best is None else Placement(*best)

    def choose_id(self, key: AdapterKey, base_model: str, *, now_ms: float) -> str | None:
        """The executor id :meth:`choose` picks, without building a :class:`Placement` (for
        callers that place millions of requests: the simulator)."""
        best = self._decide(key, base_model, now_ms)
        return None if best is None else best[0]

    # --- internals --------------------------------------------------------------------------

    def _decide(
        self, key: AdapterKey, base_model: str, now_ms: float
    ) -> tuple[str, float, float, float, float, Tier] | None:
        """Algorithm 2: (executor id, score, s_load, s_locality, s_affinity, tier) or None."""
        recent = self._recent.get(key)
        if recent is not None and recent[0][0][0] < now_ms - self.affinity_ttl_ms:
            self._expire(key, now_ms)
            recent = self._recent.get(key)
        holders = self._holders.get(key, _NO_HOLDERS)
        counts: Mapping[str, int] = _NO_COUNTS
        n_recent = 1
        special: Iterable[str] = holders
        if recent is not None:  # never empty: an emptied window is deleted
            counts, n_recent = recent[1], len(recent[0])
            special = itertools.chain(holders, [e for e in counts if e not in holders])
        w = self.weights
        alpha, beta, gamma = w.alpha, w.beta, w.gamma
        locality = self.locality
        best_total = 0.0
        best: tuple[str, float, float, float, Tier] | None = None
        executors = self.executors
        for eid in special:
            state = executors.get(eid)
            if state is None or state.base_model != base_model:
                continue
            tier = holders.get(eid, _REMOTE)
            if not is_eligible(state, tier):
                continue
            aff = counts.get(eid, 0) / n_recent if counts else 0.0
            s_load = state_load_score(state)
            s_loc = locality[tier]
            total = alpha * s_load + beta * s_loc + gamma * aff
            if best is None or total > best_total or (total == best_total and eid < best[0]):
                best_total, best = total, (eid, s_load, s_loc, aff, tier)
        order = self._orders.get(base_model)
        other: tuple[str, float] | None = None
        if order is not None and order.keys:
            s_load = -order.keys[0]
            bucket = order.buckets[s_load]
            top = bucket[0] if bucket else None
            if (
                top is not None
                and order.score.get(top) == s_load
                and top not in holders
                and top not in counts
            ):
                other = (top, s_load)  # the usual case: the top entry is live, not skipped
            else:
                other = order.best(holders, counts)
        if other is not None:
            eid, s_load = other
            s_loc = locality[_REMOTE]
            total = alpha * s_load + beta * s_loc + gamma * 0.0
            if best is None or total > best_total or (total == best_total and eid < best[0]):
                best_total, best = total, (eid, s_load, s_loc, 0.0, _REMOTE)
        if best is None:
            return None
        return (best[0], best_total, best[1], best[2], best[3], best[4])

    def _expire(self, key: AdapterKey, now_ms: float) -> None:
        """Drop ``key``'s placements older than the TTL (and the window once empty)."""
        recent = self._recent.get(key)
        if recent is None:
            return
        window, counts = recent
        horizon = now_ms - self.affinity_ttl_ms
        while window and window[0][0] < horizon:
            _, old = window.popleft()
            left = counts[old] - 1
            if left > 0:
                counts[old] = left
            else:
                del counts[old]
        if not window:
            del self._recent[key]


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
