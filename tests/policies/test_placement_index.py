"""Algorithm 2's index against a brute-force scan (Hypothesis), plus careless input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vajra.policies.placement import (
    AdapterKey,
    ExecutorState,
    PlacementIndex,
    PlacementWeights,
    Tier,
    is_eligible,
)

_IDS = [f"e{i}" for i in range(5)]
_KEYS: list[AdapterKey] = [("t1", "d1"), ("t1", "d2"), ("t2", "d1")]

_states = st.builds(
    ExecutorState,
    executor_id=st.sampled_from(_IDS),
    base_model=st.sampled_from(["m1", "m2"]),
    inflight=st.integers(0, 20),
    queue_depth=st.integers(0, 20),
    max_batch_size=st.integers(1, 16),
    max_queue=st.integers(0, 16),
    active_adapters=st.integers(0, 6),
    gpu_slots_free=st.integers(0, 2),
    draining=st.booleans(),
    gpu_slots=st.integers(1, 6),
    reported_load=st.one_of(st.none(), st.integers(0, 40)),
)

_ops = st.one_of(
    st.tuples(st.just("upsert"), _states),
    st.tuples(st.just("remove"), st.sampled_from(_IDS)),
    st.tuples(
        st.just("resident"),
        st.sampled_from(_IDS),
        st.sampled_from(_KEYS),
        st.sampled_from([None, Tier.GPU, Tier.HOST, Tier.DISK, Tier.REMOTE]),
    ),
    st.tuples(st.just("placed"), st.sampled_from(_KEYS), st.sampled_from(_IDS)),
)


def _brute(
    idx: PlacementIndex,
    states: dict[str, ExecutorState],
    residency: dict[tuple[str, AdapterKey], Tier],
    key: AdapterKey,
    base: str,
    now: float,
) -> float | None:
    best: float | None = None
    for eid, s in states.items():
        if s.base_model != base:
            continue
        tier = residency.get((eid, key), Tier.REMOTE)
        if not is_eligible(s, tier):
            continue
        total = idx.score(s, tier, idx.affinity(key, eid, now))[0]
        best = total if best is None else max(best, total)
    return best


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_ops, max_size=40),
    st.sampled_from(_KEYS),
    st.sampled_from(["m1", "m2"]),
    st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)),
)
def test_choice_scores_like_a_full_scan(
    ops: list[tuple], key: AdapterKey, base: str, w: tuple[float, float, float]
) -> None:
    idx = PlacementIndex(PlacementWeights(*w), affinity_window=4, affinity_ttl_ms=50.0)
    states: dict[str, ExecutorState] = {}
    residency: dict[tuple[str, AdapterKey], Tier] = {}
    now = 0.0
    for op in ops:
        now += 5.0
        if op[0] == "upsert":
            s = op[1]
            if s.executor_id in states and states[s.executor_id].base_model != s.base_model:
                pass  # residency survives a base-model change in both models
            states[s.executor_id] = s
            idx.upsert_executor(s)
        elif op[0] == "remove":
            states.pop(op[1], None)
            residency = {k: v for k, v in residency.items() if k[0] != op[1]}
            idx.remove_executor(op[1])
        elif op[0] == "resident":
            _, eid, k, tier = op
            idx.set_residency(eid, k, tier)
            if eid in states:
                if tier is None or tier == Tier.REMOTE:
                    residency.pop((eid, k), None)
                else:
                    residency[(eid, k)] = tier
        else:
            idx.note_placement(op[1], op[2], now)
        choice = idx.choose(key, base, now_ms=now)
        expect = _brute(idx, states, residency, key, base, now)
        if expect is None:
            assert choice is None
            continue
        assert choice is not None
        chosen = states[choice.executor_id]
        assert chosen.base_model == base
        assert is_eligible(chosen, choice.tier)
        assert choice.score == pytest.approx(expect, abs=1e-12)


def _state(eid: str, **kw: object) -> ExecutorState:
    base = dict(base_model="m", max_batch_size=8, max_queue=8, gpu_slots=4, gpu_slots_free=4)
    base.update(kw)
    return ExecutorState(eid, **base)  # type: ignore[arg-type]


def test_locality_wins_over_slightly_lower_load() -> None:
    idx = PlacementIndex(PlacementWeights())
    idx.upsert_executor(_state("a", inflight=2))
    idx.upsert_executor(_state("b"))
    idx.set_residency("a", ("t", "d"), Tier.GPU)
    p = idx.choose(("t", "d"), "m", now_ms=0)
    assert p is not None and p.executor_id == "a" and p.tier == Tier.GPU
    # Another tenant's adapter with the same digest is a different key: no locality for it.
    q = idx.choose(("u", "d"), "m", now_ms=0)
    assert q is not None and q.executor_id == "b"


def test_other_base_model_draining_full_and_no_room_are_never_chosen() -> None:
    idx = PlacementIndex(PlacementWeights())
    idx.upsert_executor(_state("other", base_model="m2"))
    idx.upsert_executor(_state("drain", draining=True))
    idx.upsert_executor(_state("full", inflight=8, queue_depth=8))
    idx.upsert_executor(_state("noroom", active_adapters=4, gpu_slots_free=0))
    assert idx.choose(("t", "d"), "m", now_ms=0) is None
    # No room for a new adapter, but it already holds this one in GPU memory: eligible.
    idx.set_residency("noroom", ("t", "d"), Tier.GPU)
    p = idx.choose(("t", "d"), "m", now_ms=0)
    assert p is not None and p.executor_id == "noroom"
    assert idx.choose(("t", "x"), "m", now_ms=0) is None


def test_full_by_dispatches_its_last_report_has_not_seen() -> None:
    idx = PlacementIndex(PlacementWeights())
    # Its report says idle, but batch plus queue (16) were dispatched since: full.
    idx.upsert_executor(_state("burst", inflight=16, reported_load=0))
    assert idx.choose(("t", "d"), "m", now_ms=0) is None
    assert not is_eligible(idx.executors["burst"], Tier.GPU)
    # Its report says full though few dispatches are outstanding here (a scheduler restart).
    idx.upsert_executor(_state("burst", inflight=1, reported_load=16))
    assert idx.choose(("t", "d"), "m", now_ms=0) is None
    idx.upsert_executor(_state("burst", inflight=15, reported_load=3))
    p = idx.choose(("t", "d"), "m", now_ms=0)
    assert p is not None and p.executor_id == "burst"


def test_affinity_follows_recent_placements_and_expires() -> None:
    idx = PlacementIndex(PlacementWeights(), affinity_window=3, affinity_ttl_ms=100)
    idx.upsert_executor(_state("a"))
    idx.upsert_executor(_state("b"))
    for t in range(3):
        idx.note_placement(("t", "d"), "b", float(t))
    p = idx.choose(("t", "d"), "m", now_ms=10)
    assert p is not None and p.executor_id == "b" and p.s_affinity == 1.0
    p = idx.choose(("t", "d"), "m", now_ms=500)
    assert p is not None and p.executor_id == "a" and p.s_affinity == 0.0


def test_affinity_is_per_adapter_of_a_tenant_not_tenant_wide() -> None:
    idx = PlacementIndex(PlacementWeights(), affinity_window=4, affinity_ttl_ms=1_000)
    idx.upsert_executor(_state("a"))
    idx.upsert_executor(_state("b", inflight=1))  # a little busier than a
    for t in range(4):
        idx.note_placement(("t", "d1"), "b", float(t))
    # d1's requests follow d1's placements to b; the tenant's other adapter, with no history,
    # goes where load says (a), and so does another tenant's request for d1's digest.
    p = idx.choose(("t", "d1"), "m", now_ms=5)
    assert p is not None and p.executor_id == "b" and p.s_affinity == 1.0
    p = idx.choose(("t", "d2"), "m", now_ms=5)
    assert p is not None and p.executor_id == "a" and p.s_affinity == 0.0
    p = idx.choose(("u", "d1"), "m", now_ms=5)
    assert p is not None and p.executor_id == "a"
    assert idx.affinity(("t", "d1"), "b", 5) == 1.0 and idx.affinity(("t", "d2"), "b", 5) == 0.0


def test_remove_and_re_add_forgets_residency() -> None:
    idx = PlacementIndex(PlacementWeights())
    idx.upsert_executor(_state("a"))
    idx.set_residency("a", ("t", "d"), Tier.HOST)
    assert idx.holders(("t", "d")) == {"a": Tier.HOST}
    idx.remove_executor("a")
    assert idx.holders(("t", "d")) == {}
    assert idx.choose(("t", "d"), "m", now_ms=0) is None
    idx.set_residency("a", ("t", "d"), Tier.GPU)  # unknown executor: ignored
    idx.remove_executor("a")  # twice: ignored
    idx.upsert_executor(_state("a"))
    p = idx.choose(("t", "d"), "m", now_ms=0)
    assert p is not None and p.tier == Tier.REMOTE


def test_a_stale_load_is_not_used() -> None:
    idx = PlacementIndex(PlacementWeights())
    idx.upsert_executor(_state("a"))
    idx.upsert_executor(_state("b", inflight=3))
    idx.upsert_executor(_state("a", inflight=6))
    p = idx.choose(("t", "d"), "m", now_ms=0)
    assert p is not None and p.executor_id == "b"
    idx.upsert_executor(_state("b", draining=True))
    p = idx.choose(("t", "d"), "m", now_ms=0)
    assert p is not None and p.executor_id == "a"


def test_many_upserts_keep_the_heap_bounded() -> None:
    idx = PlacementIndex(PlacementWeights())
    for i in range(10):
        idx.upsert_executor(_state(f"e{i}"))
    for n in range(5_000):
        idx.upsert_executor(_state(f"e{n % 10}", inflight=n % 7))
    assert idx._orders["m"].entries <= 2 * 10 + 64 + 1
    p = idx.choose(("t", "d"), "m", now_ms=0)
    assert p is not None and idx.executors[p.executor_id].inflight == 0


@pytest.mark.parametrize(
    "kw", [dict(alpha=-1.0), dict(beta=float("nan")), dict(gamma=float("inf"))]
)
def test_bad_weights_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PlacementWeights(**kw)
    with pytest.raises(ValueError):
        PlacementIndex(PlacementWeights(), affinity_window=0)
