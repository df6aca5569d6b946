"""The placement index against a brute-force scan of Algorithm 2, over many seeded random states.

Each step changes the index the way its callers do (a new state, the same state changed in place
and posted again as the simulator does, removal, residency in any tier, placements for
affinity) and then asks for a decision, which must be the executor a scan of every executor
picks: the highest score, ties to the smallest id, with the same score to the last bit (with
alpha = 0, see :meth:`_Scan.choose`). Loads are drawn from small ranges so that ties in
``s_load`` and in the score are common.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from vajra.policies.placement import (
    DEFAULT_LOCALITY,
    AdapterKey,
    ExecutorState,
    PlacementIndex,
    PlacementWeights,
    Tier,
    is_eligible,
    state_load_score,
)

_TIERS = [Tier.GPU, Tier.HOST, Tier.DISK, Tier.REMOTE, None]
_WINDOW, _TTL = 5, 40.0


def _random_state(rng: random.Random, eid: str) -> ExecutorState:
    batch, queue, slots = rng.randint(1, 4), rng.randint(0, 3), rng.randint(1, 4)
    return ExecutorState(
        eid,
        rng.choice(["m1", "m1", "m2"]),
        inflight=rng.randint(0, batch + queue),
        queue_depth=rng.randint(0, 2),
        max_batch_size=batch,
        max_queue=queue,
        active_adapters=rng.randint(0, slots + 1),
        gpu_slots_free=rng.randint(0, 1),
        draining=rng.random() < 0.05,
        gpu_slots=slots,
        reported_load=None if rng.random() < 0.7 else rng.randint(0, batch + queue + 1),
    )


class _Scan:
    """What the index should know, kept independently, and Algorithm 2 by a full scan."""

    def __init__(self, idx: PlacementIndex) -> None:
        self.idx = idx
        self.states: dict[str, ExecutorState] = {}
        self.tiers: dict[tuple[str, AdapterKey], Tier] = {}
        self.placed: dict[AdapterKey, list[tuple[float, str]]] = {}

    def affinity(self, key: AdapterKey, eid: str, now: float) -> float:
        recent = [e for t, e in self.placed.get(key, [])[-_WINDOW:] if t >= now - _TTL]
        return recent.count(eid) / len(recent) if recent else 0.0

    def choose(self, key: AdapterKey, base: str, now: float) -> tuple[str, float] | None:
        """The best by (score, then smallest id), over every executor.

        One refinement, documented in the module: executors that neither hold the adapter nor
        have affinity score ``alpha * s_load + beta * locality[REMOTE]``; among those, equal
        scores with different loads (only when alpha = 0) go to the higher ``s_load``.
        """
        w = self.idx.weights
        best_near: tuple[float, str] | None = None  # (-score, id): holders, affinity
        best_far: tuple[float, str, float] | None = None  # (-s_load, id, score): the rest
        for eid, s in self.states.items():
            tier = self.tiers.get((eid, key), Tier.REMOTE)
            if s.base_model != base or not is_eligible(s, tier):
                continue
            aff = self.affinity(key, eid, now)
            s_load = state_load_score(s)
            total = w.alpha * s_load + w.beta * DEFAULT_LOCALITY[tier] + w.gamma * aff
            if tier != Tier.REMOTE or aff > 0:
                if best_near is None or (-total, eid) < best_near:
                    best_near = (-total, eid)
            elif best_far is None or (-s_load, eid) < best_far[:2]:
                best_far = (-s_load, eid, total)
        picks = [] if best_near is None else [best_near]
        if best_far is not None:
            picks.append((-best_far[2], best_far[1]))
        if not picks:
            return None
        neg, eid = min(picks)
        return eid, -neg

    def plain_choose(self, key: AdapterKey, base: str, now: float) -> tuple[str, float] | None:
        """Algorithm 2 with no refinement: the highest score, ties to the smallest id."""
        w, best = self.idx.weights, None
        for eid, s in self.states.items():
            tier = self.tiers.get((eid, key), Tier.REMOTE)
            if s.base_model != base or not is_eligible(s, tier):
                continue
            aff = self.affinity(key, eid, now)
            total = w.alpha * state_load_score(s) + w.beta * DEFAULT_LOCALITY[tier] + w.gamma * aff
            if best is None or (-total, eid) < (-best[1], best[0]):
                best = (eid, total)
        return best


def _run(seed: int, steps: int) -> int:
    rng = random.Random(seed)
    alpha, beta, gamma = (rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in range(3))
    idx = PlacementIndex(
        PlacementWeights(alpha, beta, gamma), affinity_window=_WINDOW, affinity_ttl_ms=_TTL
    )
    scan = _Scan(idx)
    ids = [f"e{i}" for i in range(rng.randint(1, 25))]  # "e10" < "e2": ids order as strings
    tenants = ["t0", "t1", "t2"]
    keys: list[AdapterKey] = [(t, f"d{j}") for t in tenants for j in range(3)]
    now, decisions = 0.0, 0
    for _ in range(steps):
        now += rng.choice([0.0, 1.0, 7.0])
        eid, op = rng.choice(ids), rng.random()
        if op < 0.35:
            state = scan.states.get(eid)
            if state is not None and rng.random() < 0.5:  # changed in place, then posted
                fresh = _random_state(rng, eid)
                state.inflight, state.queue_depth = fresh.inflight, fresh.queue_depth
                state.active_adapters = fresh.active_adapters
                state.gpu_slots_free = fresh.gpu_slots_free
            elif state is not None and rng.random() < 0.3:  # the same figures again
                state = replace(state)
            else:
                state = _random_state(rng, eid)
            scan.states[eid] = state
            idx.upsert_executor(state)
        elif op < 0.42:
            scan.states.pop(eid, None)
            scan.tiers = {k: v for k, v in scan.tiers.items() if k[0] != eid}
            idx.remove_executor(eid)
        elif op < 0.8:
            key, tier = rng.choice(keys), rng.choice(_TIERS)
            idx.set_residency(eid, key, tier)
            if eid in scan.states:
                if tier is None or tier == Tier.REMOTE:
                    scan.tiers.pop((eid, key), None)
                else:
                    scan.tiers[(eid, key)] = tier
        else:
            key = rng.choice(keys)
            idx.note_placement(key, eid, now)
            scan.placed.setdefault(key, []).append((now, eid))
        for _ in range(2):
            key, base = rng.choice(keys), rng.choice(["m1", "m2"])
            got = idx.choose(key, base, now_ms=now)
            assert idx.choose_id(key, base, now_ms=now) == (got and got.executor_id)
            want = scan.choose(key, base, now)
            assert (None if got is None else (got.executor_id, got.score)) == want, (seed, now)
            if alpha > 0:  # loads order the scores: the plain scan agrees
                assert want == scan.plain_choose(key, base, now), (seed, now)
            if got is not None:
                state = scan.states[got.executor_id]
                assert got.tier == scan.tiers.get((got.executor_id, key), Tier.REMOTE)
                assert got.s_load == state_load_score(state)
                decisions += 1
    return decisions


@pytest.mark.parametrize("seed", range(40))
def test_decisions_match_a_full_scan(seed: int) -> None:
    _run(seed, steps=150)  # the assertions are inside, at every decision


def test_most_random_states_have_a_candidate() -> None:
    # guards the test above against drawing only states where nothing fits
    assert sum(_run(seed, steps=60) for seed in range(100, 110)) > 300


def test_many_executors_and_ties_break_to_the_smallest_id() -> None:
    idx = PlacementIndex(PlacementWeights())
    for i in range(300):
        idx.upsert_executor(
            ExecutorState(f"gpu-{i}", "m", max_batch_size=4, max_queue=4, gpu_slots=2)
        )
    p = idx.choose(("t", "d"), "m", now_ms=0)
    assert p is not None and p.executor_id == "gpu-0"
    # "gpu-0" and "gpu-1" busy: "gpu-10" is the smallest idle id as a string
    for eid in ("gpu-0", "gpu-1"):
        state = idx.executors[eid]
        state.inflight = 1
        idx.upsert_executor(state)
    p = idx.choose(("t", "d"), "m", now_ms=0)
    assert p is not None and p.executor_id == "gpu-10"
    # the holder of the adapter is skipped in the load order, scored with its locality
    idx.set_residency("gpu-10", ("t", "d"), Tier.DISK)
    p = idx.choose(("t", "d"), "m", now_ms=0)
    assert p is not None and (p.executor_id, p.tier) == ("gpu-10", Tier.DISK)
    idx.set_residency("gpu-10", ("t", "d"), None)
    q = idx.choose(("u", "d"), "m", now_ms=0)
    assert q is not None and q.executor_id == "gpu-10" and q.tier == Tier.REMOTE


def test_in_place_updates_keep_the_load_order_bounded() -> None:
    idx = PlacementIndex(PlacementWeights())
    states = [ExecutorState(f"e{i}", "m", max_batch_size=8, max_queue=8) for i in range(20)]
    for s in states:
        idx.upsert_executor(s)
    rng = random.Random(7)
    for _ in range(20_000):
        s = rng.choice(states)
        s.inflight = rng.randint(0, 16)
        idx.upsert_executor(s)
    order = idx._orders["m"]
    assert order.entries <= 2 * 20 + 64 + 1
    assert sum(len(b) for b in order.buckets.values()) == order.entries
    assert len(order.keys) == len(order.buckets)
    best = idx.choose(("t", "d"), "m", now_ms=0)
    least = min(states, key=lambda s: (s.inflight, s.executor_id))
    assert best is not None and best.executor_id == least.executor_id


def test_same_figures_again_add_no_entry() -> None:
    idx = PlacementIndex(PlacementWeights())
    s = ExecutorState("a", "m", max_batch_size=4, max_queue=0, inflight=1)
    idx.upsert_executor(s)
    for _ in range(100):
        idx.upsert_executor(replace(s))
    assert idx._orders["m"].entries == 1


def test_tiers_given_as_ints_and_bad_tiers() -> None:
    idx = PlacementIndex(PlacementWeights())
    idx.upsert_executor(ExecutorState("a", "m", max_batch_size=4, max_queue=0))
    idx.set_residency("a", ("t", "d"), 1)  # type: ignore[arg-type]
    assert idx.holders(("t", "d")) == {"a": Tier.HOST}
    assert type(idx.holders(("t", "d"))["a"]) is Tier
    with pytest.raises(ValueError):
        idx.set_residency("a", ("t", "d"), 7)  # type: ignore[arg-type]
    assert idx.holders(("t", "d")) == {"a": Tier.HOST}
    idx.set_residency("a", ("t", "d"), 3)  # type: ignore[arg-type]  # REMOTE as an int
    assert idx.holders(("t", "d")) == {}
    assert idx.residency("a") == {}
