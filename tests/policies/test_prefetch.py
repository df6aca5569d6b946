"""Algorithm 1: promotes ahead of predicted arrivals, demotes idle adapters, metrics."""

from __future__ import annotations

import math

import pytest

from vajra.policies.placement import AdapterKey, Tier
from vajra.policies.predictors import EwmaPredictor, KeepAlivePredictor, LruReactive
from vajra.policies.prefetch import Prefetcher, PrefetchMetrics, TierLoadTimes

K: AdapterKey = ("t", "d")
MB = 1 << 20


def _loads() -> TierLoadTimes:
    lt = TierLoadTimes()
    lt.observe_load(Tier.GPU, 16 * MB, 10.0)
    lt.observe_load(Tier.HOST, 16 * MB, 100.0)
    lt.observe_load(Tier.DISK, 16 * MB, 1_000.0)
    return lt


def test_load_times_are_measured_not_constant() -> None:
    lt = TierLoadTimes()
    prior = lt.load_ms(Tier.DISK, 16 * MB)
    lt.observe_load(Tier.DISK, 16 * MB, 4_000.0)
    assert lt.load_ms(Tier.DISK, 16 * MB) == pytest.approx(4_000.0) != prior
    lt.observe_load(Tier.DISK, 16 * MB, 2_000.0)  # EWMA, weight 0.2
    assert lt.load_ms(Tier.DISK, 16 * MB) == pytest.approx(3_600.0)
    assert lt.load_ms(Tier.DISK, 8 * MB) == pytest.approx(1_800.0)
    for bad in [(Tier.DISK, 0, 5.0), (Tier.DISK, MB, -1.0), (Tier.DISK, MB, math.nan)]:
        lt.observe_load(*bad)
    assert lt.measured[Tier.DISK] == 2
    assert _loads().to_tier_ms(Tier.REMOTE, Tier.GPU, 16 * MB) == pytest.approx(1_110.0)
    assert _loads().to_tier_ms(Tier.GPU, Tier.HOST, 16 * MB) == 0.0


def _periodic(pf: Prefetcher, period: float, n: int) -> float:
    t = 0.0
    for _ in range(n):
        pf.on_arrival(K, t)
        t += period
    return t - period


def test_promotes_to_gpu_before_a_predicted_arrival() -> None:
    pf = Prefetcher(
        EwmaPredictor(), lookahead_ms=1_000, load_ms=_loads(), default_size_bytes=16 * MB
    )
    last = _periodic(pf, 60_000, 5)  # every minute; the next at last + 60 s
    res = {K: Tier.REMOTE}
    assert pf.plan(last + 1, res) == []  # far away: nothing yet (idle not reached either)
    # 16 x lookahead + the store -> disk load = 17 s before: onto the disk.
    cmds = pf.plan(last + 60_000 - 16_900, res)
    assert [(c.action, c.target) for c in cmds] == [("promote", Tier.DISK)]
    res[K] = Tier.DISK
    # Host horizon: 4 s + 100 ms before; GPU horizon (from host): 1 s + 10 ms before.
    cmds = pf.plan(last + 60_000 - 4_050, res)
    assert [(c.action, c.target) for c in cmds] == [("promote", Tier.HOST)]
    res[K] = Tier.HOST
    assert pf.plan(last + 60_000 - 1_050, res) == []  # not yet
    cmds = pf.plan(last + 60_000 - 1_005, res, locate=lambda k: "exec-1")
    assert [(c.action, c.target, c.executor_id) for c in cmds] == [("promote", Tier.GPU, "exec-1")]
    res[K] = Tier.GPU
    pf.on_arrival(K, last + 60_000)
    m = pf.metrics
    assert m.prefetches == 3 and m.hits == 1 and m.cold_starts_avoided == 1
    assert m.wasted == 2 and m.wasted_bytes == 32 * MB  # the disk and host promotes were superseded
    assert m.prediction_error_ms == pytest.approx(0.0, abs=1e-6)


def test_a_promote_skips_tiers_when_late() -> None:
    pf = Prefetcher(
        EwmaPredictor(), lookahead_ms=1_000, load_ms=_loads(), default_size_bytes=16 * MB
    )
    last = _periodic(pf, 10_000, 4)
    cmds = pf.plan(last + 9_500, {})  # due keys re-planned; 500 ms before: straight to GPU
    assert [(c.action, c.target) for c in cmds] == [("promote", Tier.GPU)]


def test_demotes_idle_adapters_and_counts_waste() -> None:
    pf = Prefetcher(KeepAlivePredictor(keepalive_ms=10_000), lookahead_ms=1_000, min_idle_ms=16_000)
    pf.on_arrival(K, 0)
    assert pf.plan(5_000, {K: Tier.GPU}) == []  # still inside keep-alive
    assert pf.plan(10_001, {K: Tier.GPU}) == []  # not expected, but used 10 s ago
    cmds = pf.plan(16_000, {K: Tier.GPU})
    assert [(c.action, c.target) for c in cmds] == [("demote", Tier.HOST)]
    assert pf.plan(40_000, {K: Tier.HOST}) == []  # nothing due any more
    assert pf.metrics.demotes == 1 and pf.metrics.wasted == 0
    # Already in host memory or below: nothing to demote.
    low = Prefetcher(KeepAlivePredictor(keepalive_ms=10), lookahead_ms=1_000, min_idle_ms=0)
    low.on_arrival(K, 0)
    assert low.plan(100, {K: Tier.DISK}) == []
    deep = Prefetcher(
        KeepAlivePredictor(keepalive_ms=10), lookahead_ms=1, min_idle_ms=0, demote_to=Tier.DISK
    )
    deep.on_arrival(K, 0)
    assert [(c.action, c.target) for c in deep.plan(100, {K: Tier.HOST})] == [("demote", Tier.DISK)]


def test_unused_prefetch_is_wasted_when_demoted_or_at_close() -> None:
    pf = Prefetcher(
        EwmaPredictor(patience=1.0), lookahead_ms=1_000, load_ms=_loads(), min_idle_ms=15_000
    )
    last = _periodic(pf, 10_000, 4)
    cmds = pf.plan(last + 9_500, {})
    assert cmds and cmds[0].action == "promote"
    # The arrival never comes: past patience the adapter is demoted and the promote wasted.
    cmds = pf.plan(last + 30_000, {K: Tier.GPU})
    assert [(c.action, c.target) for c in cmds] == [("demote", Tier.HOST)]
    assert pf.metrics.wasted == 1 and pf.metrics.hit_rate == 0.0
    pf2 = Prefetcher(EwmaPredictor(), lookahead_ms=1_000, load_ms=_loads())
    last = _periodic(pf2, 10_000, 4)
    pf2.plan(last + 9_500, {})
    m = pf2.close(last + 9_600)
    assert m.wasted == 1 and m.wasted_bytes == pf2.default_size_bytes


def test_any_moment_answers_stage_in_host_memory_not_gpu() -> None:
    # A keep-alive answer ("any moment") is no forecast: an adapter that left GPU memory inside
    # the window is staged in host memory, taking no GPU slot (unless told otherwise).
    pf = Prefetcher(KeepAlivePredictor(keepalive_ms=60_000), lookahead_ms=1_000)
    assert pf.min_idle_ms == 1_000  # by default: the lookahead
    pf.on_arrival(K, 0)
    assert [(c.action, c.target) for c in pf.plan(1, {K: Tier.DISK})] == [("promote", Tier.HOST)]
    eager = Prefetcher(
        KeepAlivePredictor(keepalive_ms=60_000), lookahead_ms=1_000, stage_overdue=False
    )
    eager.on_arrival(K, 0)
    assert [c.target for c in eager.plan(1, {K: Tier.DISK})] == [Tier.GPU]


def test_one_promote_per_gap_between_arrivals() -> None:
    pf = Prefetcher(EwmaPredictor(), lookahead_ms=1_000, load_ms=_loads())
    last = _periodic(pf, 10_000, 4)
    assert [c.target for c in pf.plan(last + 9_500, {})] == [Tier.GPU]
    pf.on_evicted(K)  # the executor's LRU took it back out: that prefetch was wasted
    assert pf.metrics.wasted == 1
    assert pf.plan(last + 9_800, {K: Tier.HOST}) == []  # not promoted again before it arrives
    pf.on_arrival(K, last + 10_000)
    assert [c.target for c in pf.plan(last + 19_500, {K: Tier.HOST})] == [Tier.GPU]


def test_capacity_limits_promotes_most_urgent_first() -> None:
    pf = Prefetcher(EwmaPredictor(), lookahead_ms=1_000, load_ms=_loads(), capacities={Tier.GPU: 1})
    a, b = ("t", "a"), ("t", "b")
    for i in range(4):
        pf.on_arrival(a, i * 10_000.0)
        pf.on_arrival(b, i * 10_000.0 + 200)
    cmds = pf.plan(30_000 + 9_600, {})
    assert [(c.key, c.target) for c in cmds] == [(a, Tier.GPU)]
    cmds = pf.plan(30_000 + 9_900, {a: Tier.GPU})  # b is retried later
    assert [(c.key, c.target) for c in cmds] == [(b, Tier.GPU)]


def test_reactive_baseline_never_commands() -> None:
    pf = Prefetcher(LruReactive(), lookahead_ms=1_000)
    _periodic(pf, 1_000, 10)
    assert pf.plan(1e9, {K: Tier.GPU}) == []


def test_metrics_arithmetic() -> None:
    m = PrefetchMetrics()
    assert m.hit_rate is None and m.prediction_error_ms is None
    m.hits, m.wasted, m.forecasts, m.abs_error_ms_sum = 3, 1, 4, 100.0
    assert m.hit_rate == 0.75 and m.prediction_error_ms == 25.0
    assert m.as_dict()["hit_rate"] == 0.75


@pytest.mark.parametrize(
    "kw",
    [
        dict(lookahead_ms=0),
        dict(lookahead_ms=math.inf),
        dict(lookahead_ms=1, horizons=(4, 1, 16)),
        dict(lookahead_ms=1, demote_to=Tier.GPU),
    ],
)
def test_bad_parameters_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        Prefetcher(EwmaPredictor(), **kw)
