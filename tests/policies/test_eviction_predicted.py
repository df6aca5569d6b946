"""Prediction-aware eviction (Belady's rule on predicted times) and the predictors' point
estimates it ranks by; the prefetcher's victim, decline and re-plan after an eviction.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vajra.policies.eviction import predicted_victim
from vajra.policies.placement import AdapterKey, Tier
from vajra.policies.predictors import (
    EwmaPredictor,
    GapPredictor,
    HistogramPredictor,
    KeepAlivePredictor,
    next_arrival_estimate,
)
from vajra.policies.prefetch import Prefetcher, TierCommand, TierLoadTimes

INF = math.inf


def _pick(
    pred: dict[str, float | None], lru: list[str], busy: frozenset[str] = frozenset(), **kw: float
) -> str | None:
    kw.setdefault("now_ms", 100.0)
    return predicted_victim(lru, busy.__contains__, pred.get, **kw)


def test_the_adapter_predicted_farthest_leaves_not_the_least_recent() -> None:
    pred: dict[str, float | None] = {"a": 150.0, "b": 900.0, "c": 300.0}
    assert _pick(pred, ["a", "b", "c"]) == "b"  # LRU would evict "a", needed soonest
    # none expected ranks farthest of all, NaN too; the first such in LRU order wins
    assert _pick({**pred, "c": None}, ["a", "b", "c"]) == "c"
    assert _pick({"a": math.nan, "b": None}, ["a", "b"]) == "a"
    assert _pick({"a": 10_000.0, "b": INF}, ["a", "b"]) == "b"


def test_ties_go_to_the_least_recently_used() -> None:
    assert _pick({"a": 500.0, "b": 500.0, "c": 200.0}, ["a", "b", "c"]) == "a"
    assert _pick({"a": 500.0, "b": 500.0}, ["b", "a"]) == "b"
    # times already past mean "any moment": they tie at now
    assert _pick({"a": 5.0, "b": -INF, "c": 100.0}, ["c", "a", "b"]) == "c"


def test_adapters_in_use_are_never_chosen() -> None:
    pred: dict[str, float | None] = {"a": 150.0, "b": None, "c": 300.0}
    assert _pick(pred, ["a", "b", "c"], frozenset("b")) == "c"
    assert _pick(pred, ["a", "b", "c"], frozenset("abc")) is None
    assert _pick(pred, []) is None


def test_no_predictions_at_all_is_plain_lru() -> None:
    assert _pick({}, ["x", "y", "z"]) == "x"
    assert _pick({}, ["x", "y", "z"], frozenset("x")) == "y"


def test_a_prefetch_never_pushes_out_an_adapter_needed_sooner() -> None:
    pred: dict[str, float | None] = {"a": 150.0, "b": 900.0}
    # protected: expected within the lookahead (100 + 1000): nothing qualifies -> decline
    assert _pick(pred, ["a", "b"], protect_ms=1_000.0) is None
    assert _pick({**pred, "c": None}, ["a", "b", "c"], protect_ms=1_000.0) == "c"
    # the incoming adapter is expected at 500: only "b" (900) is needed later
    assert _pick(pred, ["a", "b"], before_ms=500.0) == "b"
    assert _pick(pred, ["a", "b"], before_ms=900.0) is None  # equal is not later
    # all predicted soon
    assert _pick({"a": 101.0, "b": 102.0}, ["a", "b"], protect_ms=50.0) is None
    # careless guards: NaN or negative protect and a NaN before_ms guard nothing
    assert _pick(pred, ["a", "b"], protect_ms=math.nan) == "b"
    assert _pick(pred, ["a", "b"], protect_ms=-5.0, before_ms=math.nan) == "b"


@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
            st.booleans(),
        ),
        max_size=12,
    ),
    st.floats(min_value=-1e6, max_value=1e6),
)
def test_the_choice_is_idle_and_nothing_idle_ranks_farther(
    items: list[tuple[float | None, bool]], now: float
) -> None:
    keys = list(range(len(items)))
    pred = {k: items[k][0] for k in keys}
    busy = {k for k in keys if items[k][1]}

    def rank(k: int) -> float:
        at = pred[k]
        return INF if at is None or at != at else max(at, now)

    v = predicted_victim(keys, busy.__contains__, pred.get, now_ms=now)
    idle = [k for k in keys if k not in busy]
    if not idle:
        assert v is None
        return
    assert v is not None and v not in busy
    assert all(rank(k) <= rank(v) for k in idle)
    assert all(rank(k) < rank(v) for k in idle if k < v)  # ties: least recent first


# --- the predictors' point estimates ---------------------------------------------------------

K: AdapterKey = ("t", "a")


def test_histogram_estimate_is_the_conditional_median_idle_time() -> None:
    h = HistogramPredictor()
    assert h.expected_next_ms(K, 0.0) is None  # unknown
    h.observe(K, 0.0)
    assert h.expected_next_ms(K, 10.0) is None  # seen once: no idle time yet
    for t in (2_000.0, 4_000.0, 64_000.0, 66_000.0):  # idle times 2 s, 2 s, 60 s, 2 s
        h.observe(K, t)
    assert h.expected_next_ms(K, 66_000.0) == 68_000.0  # median of {2, 2, 2, 60} s
    # 10 s idle: only the 60 s idle time is that long -> 60 s after the last arrival
    assert h.expected_next_ms(K, 76_000.0) == 126_000.0
    assert h.expected_next_ms(K, 127_000.0) is None  # longer than any idle time seen


def test_ewma_estimate_uses_its_gaps_after_the_mean_has_passed() -> None:
    e = EwmaPredictor(weight=1.0)
    for t in (0.0, 1_000.0, 2_000.0, 12_000.0):  # gaps 1, 1, 10 s; mean (weight 1) 10 s
        e.observe(K, t)
    assert e.expected_next_ms(K, 13_000.0) == 22_000.0
    assert e.expected_next_ms(K, 23_000.0) == e.predict_next(K, 23_000.0)  # no longer gap


def test_estimate_falls_back_to_predict_next() -> None:
    k = KeepAlivePredictor(keepalive_ms=1_000.0)
    k.observe(K, 0.0)
    assert next_arrival_estimate(k, K, 500.0) == 500.0  # any moment
    assert next_arrival_estimate(k, K, 5_000.0) is None


def test_gap_predictor_forecasts_a_period_and_the_slot_of_a_per_minute_trace() -> None:
    g = GapPredictor()
    for t in (0.0, 30_000.0, 60_000.0, 90_000.0):
        g.observe(K, t)
    assert g.predict_next(K, 95_000.0) == 120_000.0
    assert g.stable_until(K, 95_000.0) == 120_000.0
    assert g.predict_next(K, 121_000.0) is None  # overdue beyond every idle time seen
    m = GapPredictor(resolution_ms=60_000.0)
    for t in (5_000.0, 20_000.0, 310_000.0, 610_000.0):  # minutes 0, 0, 5, 10
        m.observe(K, t)
    # forecast: the start of minute 15; ranking: the sooner of that and the exact times
    assert m.predict_next(K, 620_000.0) == 900_000.0
    assert m.expected_next_ms(K, 620_000.0) == 900_000.0
    m.forget(K)
    assert m.predict_next(K, 620_000.0) is None
    for bad in ({"quantile": 1.0}, {"quantile": -0.1}, {"resolution_ms": -1.0}):
        with pytest.raises(ValueError):
            GapPredictor(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GapPredictor(resolution_ms=math.inf)


# --- the prefetcher's side --------------------------------------------------------------------


def _pf(**kw: object) -> Prefetcher:
    lt = TierLoadTimes()
    lt.observe_load(Tier.GPU, 16 << 20, 10.0)
    return Prefetcher(GapPredictor(), lookahead_ms=1_000.0, load_ms=lt, **kw)  # type: ignore[arg-type]


def _periodic(pf: Prefetcher, key: AdapterKey, period: float, until: float) -> None:
    t = 0.0
    while t <= until:
        pf.on_arrival(key, t)
        t += period


def test_prefetcher_victim_for_a_demand_load_and_for_a_promote() -> None:
    pf = _pf()
    soon, late = ("t", "soon"), ("t", "late")
    _periodic(pf, soon, 1_000.0, 10_000.0)  # next at 11 s: within the lookahead (1 s)
    _periodic(pf, late, 50_000.0, 10_000.0)  # next at 50 s
    idle = lambda k: False  # noqa: E731
    assert pf.victim([soon, late], idle, 10_500.0) == late
    assert pf.victim([soon, late], {late}.__contains__, 10_500.0) == soon  # demand: must
    cmd = TierCommand(("t", "new"), None, Tier.GPU, "promote", "x", expected_ms=11_000.0)
    assert pf.victim([soon, late], idle, 10_500.0, promote=cmd) == late
    assert pf.victim([soon], idle, 10_500.0, promote=cmd) is None  # needed sooner: decline


def test_a_declined_promote_is_no_prefetch_and_is_not_retried() -> None:
    pf = _pf()
    key = ("t", "p")
    _periodic(pf, key, 10_000.0, 40_000.0)  # next at 50 s
    cmds = pf.plan(48_995.0, {key: Tier.HOST})
    assert [(c.action, c.target, c.expected_ms) for c in cmds] == [("promote", Tier.GPU, 50_000.0)]
    pf.declined(key)
    pf.declined(("t", "unknown"))  # ignored
    m = pf.metrics
    assert (m.prefetches, m.prefetched_bytes, m.declined, m.wasted) == (0, 0, 1, 0)
    assert pf.plan(49_500.0, {key: Tier.HOST}) == []
    pf.on_arrival(key, 50_000.0)
    assert pf.metrics.hits == 0


def test_an_evicted_adapter_is_planned_again_and_brought_back() -> None:
    pf = _pf(demote_idle=False)
    key = ("t", "e")
    _periodic(pf, key, 10_000.0, 40_000.0)
    assert pf.plan(41_000.0, {key: Tier.GPU}) == []  # resident: nothing to do
    pf.on_evicted(key)  # evicted by a busier adapter; it was never prefetched
    cmds = pf.plan(48_995.0, {key: Tier.HOST})
    assert [(c.action, c.target) for c in cmds] == [("promote", Tier.GPU)]


def test_without_demote_idle_nothing_is_demoted() -> None:
    for flag, want in ((True, ["demote"]), (False, [])):
        pf = Prefetcher(KeepAlivePredictor(keepalive_ms=1_000.0), lookahead_ms=500.0)
        pf.demote_idle = flag
        pf.on_arrival(K, 0.0)
        assert [c.action for c in pf.plan(5_000.0, {K: Tier.GPU})] == want
