"""What part 5 of issue 13 changed: the placement re-post step, billing priced once per run,
the prefetch knobs (stage_overdue, min_idle_ms) and the experiment variants.

Pure CPU, at most a few thousand simulated requests per test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.cluster import build_executors
from simulations.config import SimConfigError, parse_config
from simulations.experiments import VARIANTS, main
from simulations.placement import PolicyPlacement
from simulations.prefetch import build_prefetch
from simulations.run import simulate
from vajra.policies.billing import billed_gpu_ms, inference_cost_usd


def _small(**sections: dict[str, object]) -> dict[str, Any]:
    base: dict[str, dict[str, object]] = {
        "run": {"seed": 3, "max_wait_ms": 2_000.0},
        "trace": {"kind": "synthetic-slora", "adapters": 50, "rate_per_s": 40.0, "cv": 2.0,
                  "alpha": 0.3, "duration_s": 20.0, "prompt_tokens": 32, "output_tokens": 8},
        "cluster": {"executors": 3, "gpu_slots": 8, "max_batch_size": 8, "max_queue": 8,
                    "adapter_bytes": 16_000_000, "host_bytes": 320_000_000},
        "costs": {"decode_ms_base": 5.0},
    }  # fmt: skip
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def test_load_step_one_posts_every_change_and_a_larger_step_posts_fewer() -> None:
    cfg = parse_config(_small(cluster={"executors": 2, "max_batch_size": 4, "max_queue": 4}))
    exs = build_executors(cfg.cluster)
    lagged = PolicyPlacement(exs, base_model="base", alpha=1, beta=0, gamma=0, load_step=3)
    ex = exs[0]
    for running in (1, 2, 3, 2, 1):  # rises always re-post; falls by less than 3 do not
        ex.running = running
        lagged.load_changed(ex)
    assert lagged.upserts == 3
    # the heap still ranks executor 0 at load 3: a request for a new adapter goes to executor 1
    assert lagged.choose(0, 0, 0.0) == 1
    ex.running = 0  # a fall of 3 from the posted load: posted
    lagged.load_changed(ex)
    assert lagged.upserts == 4 and lagged.choose(0, 0, 0.0) == 0
    ex.running = 8  # full: eligibility changed, so it is posted whatever the step
    lagged.load_changed(ex)
    assert lagged.upserts == 5 and lagged.choose(0, 0, 0.0) == 1
    exact = PolicyPlacement(exs, base_model="base", alpha=1, beta=0, gamma=0)
    for running in (1, 2, 1, 0):
        ex.running = running
        exact.load_changed(ex)
    assert exact.upserts == 4


def test_load_step_must_be_positive() -> None:
    exs = build_executors(parse_config({}).cluster)
    with pytest.raises(ValueError, match="load_step"):
        PolicyPlacement(exs, base_model="base", alpha=1, beta=0, gamma=0, load_step=0)
    with pytest.raises(SimConfigError, match="load_step"):
        parse_config({"policy": {"load_step": 0}})
    with pytest.raises(SimConfigError, match="stage_overdue"):
        parse_config({"policy": {"stage_overdue": -1}})
    with pytest.raises(SimConfigError, match="min_idle_ms"):
        parse_config({"policy": {"min_idle_ms": float("nan")}})


def test_load_step_one_gives_the_same_run_as_before_and_every_request_is_accounted() -> None:
    a = simulate(parse_config(_small()))
    b = simulate(parse_config(_small(policy={"load_step": 1})))
    for key in ("cold_start_rate", "ttft_ms", "e2e_ms", "loads", "billed_usd"):
        assert a[key] == b[key]
    c = simulate(parse_config(_small(policy={"load_step": 4})))
    assert c["completed"] + sum(c["errors"].values()) == c["requests"] == a["requests"]


def test_billing_priced_once_equals_the_sum_of_each_request() -> None:
    cfg = parse_config(_small())
    r = simulate(cfg)
    e = cfg.economics
    assert r["billed_usd"] > 0
    # the engine bills each request's GPU time rounded up; cost is linear in billed ms
    one = inference_cost_usd(
        billed_gpu_ms(7.3, e.billing_granularity_ms),
        gpu_price_per_hour=e.gpu_price_per_hour,
        tenancy_factor=e.tenancy_factor,
    )
    two = inference_cost_usd(
        2 * billed_gpu_ms(7.3, e.billing_granularity_ms),
        gpu_price_per_hour=e.gpu_price_per_hour,
        tenancy_factor=e.tenancy_factor,
    )
    assert two == pytest.approx(2 * one)
    # at least the 1 ms minimum per completed request, at most its GPU time rounded up
    floor = inference_cost_usd(
        r["completed"], gpu_price_per_hour=e.gpu_price_per_hour, tenancy_factor=e.tenancy_factor
    )
    assert r["billed_usd"] >= floor


@pytest.mark.parametrize("variant", sorted(v for v in VARIANTS if v.endswith("-warm")))
def test_warm_variants_hold_adapters_in_gpu_and_account_every_request(variant: str) -> None:
    overrides = {k.split(".")[1]: v for k, v in VARIANTS[variant].items()}
    warm = simulate(parse_config(_small(policy=overrides)))
    staged = simulate(parse_config(_small(policy={**overrides, "stage_overdue": 1})))
    for r in (warm, staged):
        assert r["completed"] + sum(r["errors"].values()) == r["requests"]
        assert r["unfinished"] == 0
    # the knobs reach the prefetcher unchanged
    cfg = parse_config(_small(policy={**overrides, "min_idle_ms": 2_500.0}))
    pf = build_prefetch(cfg)
    assert pf is not None
    assert pf.prefetcher.stage_overdue is False and pf.prefetcher.min_idle_ms == 2_500.0
    default = build_prefetch(parse_config(_small(policy={"prefetch": "ewma"})))
    assert default is not None and default.prefetcher.stage_overdue is True
    assert default.prefetcher.min_idle_ms == default.prefetcher.lookahead_ms
    assert build_prefetch(parse_config(_small())) is None


def test_experiments_record_a_bad_predictor_and_go_on(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["nonsense", "--out", str(tmp_path)])
    args = ["prefetch", "--only", "prefetch_azure2021", "--out", str(tmp_path)]
    assert main([*args, "--predictor", "none", "--predictor", "bogus"]) == 0
    rows = json.loads((tmp_path / "prefetch-prefetch_azure2021.json").read_text())
    assert [r["label"] for r in rows] == ["none", "bogus"]
    assert "error" not in rows[0] and rows[0]["requests"] > 0
    assert "bogus" in rows[1]["error"]
    assert (tmp_path / "prefetch-prefetch_azure2021.png").stat().st_size > 0


def test_a_merged_run_joins_the_earlier_sweep_and_replaces_its_own_label(tmp_path: Path) -> None:
    args = ["prefetch", "--only", "prefetch_azure2021", "--out", str(tmp_path)]
    path = tmp_path / "prefetch-prefetch_azure2021.json"
    assert main([*args, "--predictor", "none", "--predictor", "gap"]) == 0
    first = json.loads(path.read_text())
    assert main([*args, "--merge", "--predictor", "ewma", "--predictor", "gap"]) == 0
    rows = json.loads(path.read_text())
    assert [r["label"] for r in rows] == ["none", "ewma", "gap"]
    assert rows[0]["report"] == first[0]["report"]  # kept as it was
    # compared with the kept reactive run, as in a whole sweep
    for r in rows:
        expected = round(1 - r["cold_start_rate"] / rows[0]["cold_start_rate"], 4)
        assert r["cold_starts_vs_reactive"] == expected
    # without --merge the file is the new sweep alone; a broken file is refused, not lost
    assert main([*args, "--predictor", "none"]) == 0
    assert [r["label"] for r in json.loads(path.read_text())] == ["none"]
    path.write_text("{not json")
    with pytest.raises(SimConfigError, match="cannot merge"):
        main([*args, "--merge", "--predictor", "gap"])
    assert path.read_text() == "{not json"
