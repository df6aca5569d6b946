"""The agreement parameters: the adapters' own compute and the serving path outside the engine.

``costs.adapter_compute_factor`` and ``costs.serving_ms`` come from measured bench JSON
(``g_adapters`` of ``vajra bench engine``; ``vajra bench serving``). Pure CPU, files only under
tmp_path; every run simulates a handful of requests.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from simulations.calibration import adapter_compute_factor, calibrated, serving_ms
from simulations.cluster import build_executors
from simulations.config import SimConfigError, load_config, parse_config
from simulations.engine import Simulator
from simulations.placement import LeastLoaded
from simulations.run import simulate, tenant_of
from vajra.traces import Trace

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "docs" / "bench-results"
AGREEMENT = REPO / "simulations" / "configs" / "agreement_tiny.toml"

ONE: dict[str, dict[str, Any]] = {
    "cluster": {
        "executors": 1, "max_batch_size": 2, "max_queue": 4, "gpu_slots": 2,
        "adapter_bytes": 1_000_000, "remote_gbps": 1.0, "remote_latency_ms": 4.0,  # 5 ms load
    },
    "costs": {"prefill_ms_base": 2.0, "prefill_ms_per_token": 0.5,
              "decode_ms_base": 3.0, "decode_ms_per_seq": 1.0},
    "policy": {"placement": "least-loaded"},
}  # fmt: skip


def _run(costs: dict[str, Any]) -> Simulator:
    cfg = parse_config({**ONE, "costs": {**ONE["costs"], **costs}})
    trace = Trace(
        t_ms=[0.0, 40.0], source=[0, 0], prompt_tokens=[4, 4], output_tokens=[3, 3],
        sources=["0"], name="hand",
    )  # fmt: skip
    exs = build_executors(cfg.cluster)
    sim = Simulator(cfg, trace, exs, LeastLoaded(exs))
    sim.run()
    return sim


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_factor_and_serving_path_by_hand() -> None:
    plain = _run({})
    # r0: cold, load 0..5, prefill 2 + 0.5 x 4 = 4 -> 9, two decodes of 3 + 1 = 4 -> 17
    # r1: warm at 40 (r0 done, so alone), prefill 4 -> 44, two decodes -> 52
    assert plain.metrics.ttft_ms.tolist() == [9.0, 4.0]
    assert plain.metrics.e2e_ms.tolist() == [17.0, 12.0]
    sim = _run({"adapter_compute_factor": 1.5, "serving_ms": 10.0})
    # every engine time x 1.5 (the load is not compute); 10 ms of serving path on each latency
    assert sim.metrics.ttft_ms.tolist() == [10.0 + 5.0 + 6.0, 10.0 + 6.0]
    assert sim.metrics.e2e_ms.tolist() == [10.0 + 5.0 + 6.0 + 12.0, 10.0 + 6.0 + 12.0]
    # the serving path is not GPU time; the adapter's compute is
    assert sim.metrics.gpu_ms_total == pytest.approx(1.5 * plain.metrics.gpu_ms_total)
    assert sim.span_ms == pytest.approx(40.0 + 18.0)  # the executor's schedule has no 10 ms


def test_serving_path_alone_shifts_latency_and_nothing_else() -> None:
    plain, shifted = _run({}), _run({"serving_ms": 7.5})
    assert (shifted.metrics.ttft_ms - plain.metrics.ttft_ms).tolist() == [7.5, 7.5]
    assert (shifted.metrics.e2e_ms - plain.metrics.e2e_ms).tolist() == [7.5, 7.5]
    assert shifted.metrics.cold.tolist() == plain.metrics.cold.tolist() == [True, False]
    assert shifted.summary()["billed_usd"] == plain.summary()["billed_usd"]


@pytest.mark.parametrize(
    "costs, needle",
    [
        ({"adapter_compute_factor": 0}, "must be positive"),
        ({"adapter_compute_factor": -1.7}, "must be positive"),
        ({"adapter_compute_factor": "1.7"}, "expected a number"),
        ({"adapter_compute_factor": float("inf")}, "finite"),
        ({"serving_ms": -1.0}, ">= 0"),
        ({"serving_ms": float("nan")}, "finite"),
        ({"serving_ms": True}, "booleans"),
        ({"bench_serving_json": 3}, "expected a string"),
    ],
)
def test_bad_values_are_refused(costs: dict[str, Any], needle: str) -> None:
    with pytest.raises(SimConfigError) as e:
        parse_config({"costs": costs})
    assert needle in str(e.value) and "[costs]" in str(e.value)


def test_factor_from_the_engine_bench() -> None:
    # g_adapters at 32 adapters and 32 requests in flight: 0.583 of the base's tokens/s
    assert adapter_compute_factor(BENCH / "engine-after-paged-kv.json") == round(1 / 0.583, 4)


def test_factor_takes_the_lowest_concurrency_and_checks_the_ratio(tmp_path: Path) -> None:
    results = [
        {"concurrency": 128, "adapters_vs_base": 0.8},
        {"concurrency": 8, "adapters_vs_base": 0.5},
    ]
    assert (
        adapter_compute_factor(_write(tmp_path / "a.json", {"g_adapters": {"results": results}}))
        == 2.0
    )
    assert adapter_compute_factor(_write(tmp_path / "none.json", {"a_concurrency": {}})) is None
    bads: list[dict[str, Any]] = [
        {"g_adapters": {"results": []}},
        {"g_adapters": {"results": [{"concurrency": 1}]}},
        {"g_adapters": {"results": [{"concurrency": 1, "adapters_vs_base": "x"}]}},
        {"g_adapters": {"results": [{"concurrency": 1, "adapters_vs_base": 0}]}},
        {"g_adapters": {"results": [{"concurrency": 1, "adapters_vs_base": -0.5}]}},
        {"g_adapters": None},
    ]
    for bad in bads:
        with pytest.raises(SimConfigError, match="g_adapters"):
            adapter_compute_factor(_write(tmp_path / "bad.json", bad))


def test_serving_path_from_the_serving_bench() -> None:
    # sdk_stream_adapters' first token 26.4 ms, engine_adapters 0.4184 s over 128 steps
    assert serving_ms(BENCH / "serving-after-2.json") == pytest.approx(26.4 - 418.4 / 128, abs=1e-3)


def test_serving_path_falls_back_and_refuses_nonsense(tmp_path: Path) -> None:
    base = {"sdk_stream": {"first_token_p50_ms": 20.0}, "engine": {"seconds": 0.5, "steps": 100}}
    assert serving_ms(_write(tmp_path / "s.json", base)) == 15.0
    half = {**base, "sdk_stream_adapters": {"first_token_p50_ms": 99.0}}  # no engine_adapters
    assert serving_ms(_write(tmp_path / "half.json", half)) == 15.0
    for bad, needle in (
        ({"sdk_stream": {}, "engine": base["engine"]}, "not a vajra bench serving"),
        ({**base, "engine": {"seconds": 0.5, "steps": 0}}, "not a vajra bench serving"),
        ({**base, "engine": {"seconds": "x", "steps": 1}}, "not a vajra bench serving"),
        ({**base, "sdk_stream": {"first_token_p50_ms": 1.0}}, "not after one engine step"),
        ([], "JSON object"),
    ):
        with pytest.raises(SimConfigError, match=needle):
            serving_ms(_write(tmp_path / "bad.json", bad))
    with pytest.raises(SimConfigError, match="cannot read"):
        serving_ms(tmp_path / "absent.json")


def test_agreement_config_is_calibrated_from_both_benches(tmp_path: Path) -> None:
    cfg = calibrated(load_config(AGREEMENT))
    assert cfg.costs.adapter_compute_factor == round(1 / 0.583, 4)
    paced = BENCH / "agreement-paced-tiny-cpu.json"  # one request at a time, idle between
    assert cfg.costs.serving_ms == serving_ms(paced) > 0
    assert cfg.host.cores == 2 and cfg.host.serving_cpu_ms > 0 and cfg.host.background_cores > 0
    assert cfg.policy.placement == "vajra"
    # a config that names a missing serving bench fails whole, naming the file
    broken = dataclasses.replace(
        cfg, costs=dataclasses.replace(cfg.costs, bench_serving_json="absent.json")
    )
    with pytest.raises(SimConfigError, match=r"absent\.json"):
        calibrated(broken)
    # no bench named: the configured values stay
    own = parse_config({"costs": {"adapter_compute_factor": 1.25, "serving_ms": 3.0}})
    assert calibrated(own).costs == own.costs


def test_tenants_map_adapters_and_reach_placement() -> None:
    assert [tenant_of(parse_config({"trace": {"tenants": 0}}))(a) for a in (0, 7)] == [0, 7]
    assert [tenant_of(parse_config({"trace": {"tenants": 1}}))(a) for a in (0, 7)] == [0, 0]
    assert [tenant_of(parse_config({"trace": {"tenants": 3}}))(a) for a in (0, 4, 8)] == [0, 1, 2]
    for bad, needle in (({"tenants": -1}, ">= 0"), ({"tenants": 1.5}, "expected an integer")):
        with pytest.raises(SimConfigError, match=re.escape(needle)):
            parse_config({"trace": bad})
    assert load_config(AGREEMENT).trace.tenants == 1  # the replay's one tenant
    small = {
        "trace": {"kind": "synthetic-slora", "adapters": 20, "rate_per_s": 50.0,
                  "duration_s": 5.0, "prompt_tokens": 8, "output_tokens": 4, "tenants": 1},
        "cluster": {"executors": 2, "gpu_slots": 4, "adapter_bytes": 1_000_000},
        "policy": {"placement": "vajra"},
    }  # fmt: skip
    report = simulate(parse_config(small))
    assert report["completed"] == report["requests"] > 0 and report["errors"] == {}
