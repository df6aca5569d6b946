"""The predictor's forecasts in the live path: the predictor builds them, the scheduler cuts
them per executor, and an executor's tiers evict the adapter expected farthest away.

Test rules: a tiny model, PEFT-saved adapters and a CPU pool for the tiers; a fake clock for
freshness (no sleeping); every I/O test under ``trio.fail_after``.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import trio

from tests.actors.tier_kit import (
    KitAdapter,
    make_pool,
    make_tiers,
    save_adapters,
    store_adapters,
)
from tests.inprocess import inprocess_config
from vajra.actors.adapter_forecasts import Forecasts
from vajra.actors.predictor import Predictor
from vajra.actors.scheduler_placement import LivePlacement
from vajra.adapters.format import base_model_spec
from vajra.bus.messages import AdapterForecasts, LoadReport, RequestEvent
from vajra.config import VajraConfig
from vajra.state import ClusterState
from vajra.storage import LocalObjectStore

NOW = 1_000_000.0


class Clock:
    def __init__(self) -> None:
        self.ms = NOW

    def __call__(self) -> float:
        return self.ms


def test_the_adapter_expected_farthest_goes_while_forecasts_are_fresh() -> None:
    clock = Clock()
    f = Forecasts(max_age_ms=4_000, clock=clock)
    lru = ["a", "b", "c", "d"]  # least recently used first
    in_use = lambda d: d == "c"  # noqa: E731 - c is held by a request
    assert f.victim(lru, in_use) == "a"  # no forecasts yet: LRU
    msg = AdapterForecasts(["a", "b", "c"], [NOW + 10, NOW + 90_000, math.inf], int(NOW))
    assert f.update(msg)
    # b is expected latest among the idle ones (c is in use); d, unforecast, counts as now.
    assert f.victim(lru, in_use) == "b"
    f.update(AdapterForecasts(["a", "b"], [math.nan, NOW + 5], int(NOW)))
    assert f.victim(lru, in_use) == "a"  # NaN: no arrival expected at all
    f.update(AdapterForecasts(["a", "b"], [NOW - 50, NOW - 10], int(NOW)))
    assert f.victim(lru, in_use) == "a"  # all "any moment": ties go to the least recently used
    assert f.victim(["c"], in_use) is None  # everything in use
    clock.ms += 4_001  # stale: back to LRU
    assert not f.fresh()
    f2 = Forecasts(max_age_ms=4_000, clock=clock)
    f2.update(AdapterForecasts(["a"], [NOW + 90_000.0], int(NOW)))
    clock.ms += 5_000
    assert f2.victim(["b", "a"], lambda d: False) == "b"
    assert not f2.update(AdapterForecasts(["a", "b"], [1.0], 0))  # lengths differ: dropped


def test_the_threshold_trim_ranks_by_forecast_while_fresh() -> None:
    clock = Clock()
    f = Forecasts(max_age_ms=4_000, clock=clock)
    lru = ["a", "b", "c", "d"]
    idle = lambda d: False  # noqa: E731
    assert f.trim(lru, idle, 4, 0.5) == ["a", "b"]  # no forecasts: LRU
    f.update(AdapterForecasts(["a", "b", "c"], [NOW + 10, NOW + 5, NOW + 90_000], int(NOW)))
    # c is expected latest; d (not named) counts as expected now, after a and b.
    assert f.trim(lru, idle, 4, 0.5) == ["c", "a"]
    clock.ms += 4_001
    assert f.trim(lru, idle, 4, 0.5) == ["a", "b"]  # stale: LRU again


@pytest.fixture(scope="module")
def dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save_adapters(tiny_model_dir, tmp_path_factory.mktemp("fc"), (4, 4, 4), seed=11)


async def test_a_load_evicts_the_forecast_farthest_not_the_least_recently_used(
    tmp_path: Path, tiny_model_dir: Path, dirs: list[Path]
) -> None:
    spec = base_model_spec(tiny_model_dir)
    stored: list[KitAdapter] = store_adapters(LocalObjectStore(tmp_path / "objects"), dirs, spec)
    pool = make_pool(spec, 2, 4)  # two adapters at once
    tiers = make_tiers(tmp_path, tiny_model_dir, pool, trio.CapacityLimiter(1))
    old, recent, new = stored
    with trio.fail_after(60):
        for a in (old, recent):  # old is the least recently used
            await tiers.acquire(a.digest, a.key)
            tiers.release(a.digest)
        now = tiers.forecasts._clock()
        # The predictor expects `old` in a second and `recent` not for an hour.
        tiers.forecasts.update(
            AdapterForecasts([old.digest, recent.digest], [now + 1_000, now + 3_600_000], 0)
        )
        await tiers.acquire(new.digest, new.key)
        tiers.release(new.digest)
    assert set(tiers.gpu) == {old.digest, new.digest}  # LRU would have evicted `old`


async def test_a_gpu_prefetch_never_pushes_out_an_adapter_needed_sooner(
    tmp_path: Path, tiny_model_dir: Path, dirs: list[Path]
) -> None:
    spec = base_model_spec(tiny_model_dir)
    stored: list[KitAdapter] = store_adapters(LocalObjectStore(tmp_path / "objects"), dirs, spec)
    pool = make_pool(spec, 2, 4)
    tiers = make_tiers(tmp_path, tiny_model_dir, pool, trio.CapacityLimiter(1))
    a, b, c = stored
    with trio.fail_after(60):
        assert tiers.may_prefetch(a.digest, 0.0)  # a free slot: always
        for x in (a, b):
            await tiers.acquire(x.digest, x.key)
            tiers.release(x.digest)
    now = tiers.forecasts._clock()
    assert tiers.may_prefetch(c.digest, now + 60_000)  # no forecasts: LRU, allowed
    tiers.forecasts.update(AdapterForecasts([a.digest, b.digest], [now + 1_000, now + 5_000], 0))
    assert not tiers.may_prefetch(c.digest, now + 60_000)  # both are needed sooner than c
    assert tiers.may_prefetch(c.digest, now + 2_000)  # b is needed later than c
    assert tiers.may_prefetch(a.digest, now + 60_000)  # already resident: nothing pushed out


def _report(eid: str, **kw: object) -> LoadReport:
    return LoadReport(eid, "i1", 0, 0, **kw)  # type: ignore[arg-type]


def test_the_scheduler_sends_each_executor_the_forecasts_of_its_gpu_adapters(
    tmp_path: Path, valkey_url: str
) -> None:
    lp = LivePlacement(inprocess_config(tmp_path, valkey_url), Counter())
    for eid in ("a", "b", "c"):
        lp.joined(eid, 4, 4)
    lp.reported(_report("a", resident_adapters=["d1", "d2"]), dispatched=0)
    lp.reported(_report("b", resident_adapters=["d3"], host_adapters=["d1"]), dispatched=0)
    msg = AdapterForecasts(["d1", "d2", "d9"], [1.0, 2.0, 3.0], 7)
    parts = dict(lp.forecasts_for(msg, ["a", "b", "c"]))
    assert set(parts) == {"a"}  # b holds d1 only in host memory; c holds nothing
    assert (parts["a"].digests, parts["a"].next_arrival_ms) == (["d1", "d2"], [1.0, 2.0])
    assert lp.forecasts_for(AdapterForecasts(["d1"], [], 0), ["a"]) == []


def test_the_predictor_forecasts_the_adapters_it_counts_in_gpu_memory(
    tmp_path: Path, valkey_url: str
) -> None:
    cfg: VajraConfig = inprocess_config(tmp_path, valkey_url).replace(
        "predictor", kind="keepalive", keepalive_ms=60_000
    )
    with ClusterState(valkey_url) as state:
        p = Predictor(cfg, state)
        try:
            assert p.forecasts(10_000.0) is None
            # Two tenants share digest d1; their forecasts merge to the sooner one.
            for tenant, ts in (("t1", 1_000), ("t2", 5_000)):
                p.record(RequestEvent("r", tenant, "x", "e", ts, 1, "d1", "obj/d1"))
            p.record(RequestEvent("r", "t1", None, "e", 5_000))  # base model: never forecast
            msg = p.forecasts(6_000.0)
            assert msg is not None and msg.digests == ["d1"]
            assert len(msg.next_arrival_ms) == 1
        finally:
            p.events.close()
            p.scheduler.close()
            p._ctx.term()
