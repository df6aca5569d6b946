"""Prediction-aware eviction in the simulator's tiers, the warm-up period, the cold-start
breakdown and the oracle ceiling (issue 13, prefetch).

Pure CPU, at most a few thousand simulated requests per test.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from simulations.cluster import TierTimes, build_executors
from simulations.config import SimConfigError, parse_config
from simulations.engine import Simulator
from simulations.metrics import MetricsStore, cold_breakdown
from simulations.placement import LeastLoaded
from simulations.prefetch import OraclePredictor, build_prefetch
from simulations.run import simulate
from vajra.traces import Trace

CLUSTER: dict[str, object] = {
    "executors": 1, "max_batch_size": 4, "max_queue": 64, "gpu_slots": 2,
    "adapter_bytes": 1_000_000, "host_bytes": 8_000_000, "disk_bytes": 16_000_000,
}  # fmt: skip


def _trace(rows: list[tuple[float, int]], adapters: int) -> Trace:
    t = [r[0] for r in rows]
    return Trace(
        t_ms=t, source=[r[1] for r in rows], prompt_tokens=[4] * len(t),
        output_tokens=[2] * len(t), sources=[str(i) for i in range(adapters)], name="hand",
    )  # fmt: skip


def _run(policy: dict[str, object], tr: Trace, **sections: dict[str, object]) -> Simulator:
    cfg = parse_config({"cluster": CLUSTER, "policy": policy, **sections})
    exs = build_executors(cfg.cluster)
    sim = Simulator(cfg, tr, exs, LeastLoaded(exs), prefetch=build_prefetch(cfg))
    sim.run()
    return sim


# Three adapters in a cycle through two GPU slots: LRU evicts exactly the one needed next.
CYCLE = _trace([(i * 1_000.0, i % 3) for i in range(60)], adapters=3)


def test_lru_thrashes_on_a_cycle_and_predicted_eviction_does_not() -> None:
    lru = _run({"prefetch": "none"}, CYCLE).summary()
    assert lru["cold_starts"] == 60  # every request
    quick = {"lookahead_ms": 300.0, "tick_ms": 100.0}  # the cycle is shorter than 5 s
    for prefetch in ("oracle", "gap"):
        pred = _run({"prefetch": prefetch, "eviction": "predicted", **quick}, CYCLE).summary()
        assert pred["completed"] == 60
        assert pred["cold_starts"] < 20, prefetch  # prefetched ahead, victims chosen by time
        assert pred["loads"]["bytes_moved"] <= lru["loads"]["bytes_moved"]
    # the same predictors with LRU eviction: each promote pushes out the adapter needed next,
    # which then has to be promoted back: the same cold starts for almost twice the bytes
    for prefetch in ("oracle", "gap"):
        same = _run({"prefetch": prefetch, "eviction": "lru", **quick}, CYCLE).summary()
        assert same["loads"]["bytes_moved"] > 1.5 * pred["loads"]["bytes_moved"]
    # a lookahead longer than the cycle: every candidate victim is needed within it, so each
    # promote is declined; Belady's choice on demand loads alone still halves the cold starts
    slow = _run({"prefetch": "oracle", "eviction": "predicted"}, CYCLE).summary()
    assert slow["prefetch"]["declined"] > 20 and slow["prefetch"]["prefetches"] == 0
    assert slow["cold_starts"] <= 31


def test_the_victim_hook_chooses_even_adapter_zero() -> None:
    cfg = parse_config({"cluster": CLUSTER})
    ex = build_executors(cfg.cluster)[0]
    times = TierTimes.from_cluster(cfg.cluster)
    ex.load_to_gpu(0, 0.0, times, 1)
    ex.load_to_gpu(1, 0.0, times, 1)
    ex.touch(0)  # LRU order now 1, 0: LRU would evict 1
    asked: list[tuple[int, float]] = []

    def pick(e: Any, incoming: int, now: float) -> int | None:
        asked.append((incoming, now))
        return 0

    ex.pick_victim = pick
    ex.load_to_gpu(2, 5.0, times, 1)
    assert asked == [(2, 5.0)] and set(ex.gpu) == {1, 2}
    ex.pick_victim = lambda e, i, n: None  # no choice (all protected): LRU as before
    ex.load_to_gpu(0, 6.0, times, 1)
    assert set(ex.gpu) == {2, 0}


def test_warmup_requests_are_in_no_figure() -> None:
    rows = [(float(t), t % 3) for t in range(0, 20_000, 500)]  # 40 requests, 20 in the warm-up
    trace = _trace(rows, adapters=3)
    cold = _run({"prefetch": "none"}, trace).summary()
    warm = _run({"prefetch": "none"}, trace, trace={"warmup_s": 10.0}).summary()
    assert cold["requests"] == 40 and cold["warmup_requests"] == 0
    assert warm["requests"] == 20 and warm["warmup_requests"] == 20
    assert warm["completed"] == 20 and warm["unfinished"] == 0
    # every load after the warm-up is a reload after an eviction; first touches fell before it
    assert warm["loads"]["gpu_loads"] == warm["cold_starts"] < cold["cold_starts"]
    assert warm["span_ms"] < cold["span_ms"] - 9_000.0
    with_pf = _run({"prefetch": "ewma"}, trace, trace={"warmup_s": 10.0}).summary()
    assert with_pf["prefetch"]["prefetches"] <= with_pf["loads"]["prefetch_loads"] + 20
    # a warm-up past the last request leaves nothing measured, and says so
    none = _run({"prefetch": "none"}, trace, trace={"warmup_s": 60.0}).summary()
    assert none["requests"] == 0 and none["cold_start_rate"] is None


def test_cold_breakdown_counts_first_touches_and_gaps() -> None:
    trace = _trace([(0.0, 0), (5_000.0, 0), (70_000.0, 0), (71_000.0, 1)], adapters=2)
    store = MetricsStore(4)
    for i in range(4):
        store.finish(i, 1.0, 2.0, cold=i != 1)
    b = cold_breakdown(np.asarray(trace.t_ms), np.asarray(trace.source), store)
    assert b["requests"] == {"first_touch": 2, "gap_under_10s": 1, "gap_10s_1min": 0,
                             "gap_1_10min": 1, "gap_over_10min": 0}  # fmt: skip
    assert b["cold"]["first_touch"] == 2 and b["cold"]["gap_1_10min"] == 1
    assert sum(b["cold"].values()) == 3
    store.first = 2  # warm-up: the first two are left out, but still count as history
    b = cold_breakdown(np.asarray(trace.t_ms), np.asarray(trace.source), store)
    assert b["requests"]["first_touch"] == 1 and sum(b["requests"].values()) == 2
    empty = cold_breakdown(np.zeros(0), np.zeros(0, dtype=np.int32), MetricsStore(0))
    assert sum(empty["cold"].values()) == 0


def test_the_breakdown_is_reported_when_asked() -> None:
    sim = _run({"prefetch": "none"}, CYCLE, run={"cold_breakdown": 1})
    s = sim.summary()
    assert sum(s["cold_breakdown"]["cold"].values()) == s["cold_starts"]
    assert "cold_breakdown" not in _run({"prefetch": "none"}, CYCLE).summary()


def test_oracle_knows_the_next_request_of_adapters_it_has_seen() -> None:
    o = OraclePredictor()
    o.load(np.array([0.0, 10.0, 65_000.0, 20.0]), np.array([0, 0, 0, 1]))
    k0, k1 = ("tenant-0", "adapter-0"), ("tenant-1", "adapter-1")
    assert o.predict_next(k0, 0.0) is None  # never seen: unknowable
    o.observe(k0, 0.0)
    assert o.predict_next(k0, 1.0) == 10.0
    assert o.predict_next(k0, 12.0) == 12.0  # due: any moment
    o.observe(k0, 10.0)
    assert o.predict_next(k0, 11.0) == 65_000.0
    o.observe(k1, 20.0)
    assert o.predict_next(k1, 21.0) is None  # its last request
    o.observe(("tenant-7", "adapter-7"), 5.0)  # not in the trace: harmless
    assert o.predict_next(("tenant-7", "adapter-7"), 6.0) is None
    o.observe(("x", "not-an-index"), 5.0)
    assert o.predict_next(("x", "not-an-index"), 6.0) is None
    minute = OraclePredictor(60_000.0)
    minute.load(np.array([0.0, 65_000.0]), np.array([0, 0]))
    minute.observe(k0, 0.0)
    assert minute.predict_next(k0, 1.0) == 60_000.0  # only the minute is known


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        ({"policy": {"eviction": "belady"}}, "eviction"),
        ({"policy": {"prefetch": "psychic"}}, "prefetch"),
        ({"trace": {"warmup_s": 30.0, "duration_s": 30.0}}, "warmup_s"),
        ({"trace": {"warmup_s": -1.0}}, "warmup_s"),
        ({"policy": {"gap_quantile": -0.5}}, "gap_quantile"),
    ],
)
def test_bad_settings_are_refused(bad: dict[str, Any], msg: str) -> None:
    with pytest.raises(SimConfigError, match=msg):
        parse_config(bad)


SMALL: dict[str, Any] = {
    "trace": {"kind": "synthetic-slora", "adapters": 40, "rate_per_s": 30.0,
              "alpha": 0.3, "duration_s": 40.0, "warmup_s": 10.0},
    "cluster": {"executors": 2, "gpu_slots": 6, "adapter_bytes": 16_000_000},
    "policy": {"prefetch": "histogram", "eviction": "predicted"},
    "run": {"cold_breakdown": 1},
}  # fmt: skip


def test_the_shipped_sweep_runs_with_warmup_and_predicted_eviction() -> None:
    r = simulate(parse_config(SMALL))
    assert r["unfinished"] == 0 and r["completed"] + sum(r["errors"].values()) == r["requests"]
    assert 0 < r["requests"] < r["trace"]["requests"]
    assert r["prefetch"]["demotes"] == 0  # predicted eviction: nothing demoted while idle
