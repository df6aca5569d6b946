"""CPU contention on a shared machine (``[host]``, :mod:`simulations.host`), and its parameters
from a ``vajra bench paced`` JSON. Pure CPU, files only under tmp_path, a few requests each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.calibration import calibrated, paced_host, serving_ms
from simulations.cluster import build_executors
from simulations.config import SimConfigError, parse_config
from simulations.engine import Simulator
from simulations.host import slowdown
from simulations.placement import LeastLoaded
from vajra.traces import Trace

TWO: dict[str, dict[str, Any]] = {
    "cluster": {
        "executors": 2, "max_batch_size": 2, "max_queue": 4, "gpu_slots": 2,
        "adapter_bytes": 1_000_000, "remote_gbps": 1.0, "remote_latency_ms": 4.0,  # 5 ms load
    },
    "costs": {"prefill_ms_base": 2.0, "prefill_ms_per_token": 0.5,
              "decode_ms_base": 3.0, "decode_ms_per_seq": 1.0},
    "policy": {"placement": "least-loaded"},
}  # fmt: skip


def _run(host: dict[str, Any], *, serving: float = 0.0) -> Simulator:
    cfg = parse_config({**TWO, "costs": {**TWO["costs"], "serving_ms": serving}, "host": host})
    trace = Trace(
        t_ms=[0.0, 1.0], source=[0, 1], prompt_tokens=[4, 4], output_tokens=[3, 3],
        sources=["0", "1"], name="hand",
    )  # fmt: skip
    exs = build_executors(cfg.cluster)
    sim = Simulator(cfg, trace, exs, LeastLoaded(exs))
    sim.run()
    return sim


def test_slowdown_by_hand() -> None:
    assert slowdown(cores=0, computing=9, inflight=9, serving_cpu_ms=9.0, nominal_ms=1.0) == 1.0
    # under the machine's cores: no slowdown
    assert slowdown(cores=2, computing=1, inflight=1, serving_cpu_ms=5.0, nominal_ms=10.0) == 1.0
    # 2 computing + 3 requests x 10 ms of serving CPU over 10 ms + 0.5 idle = 5.5 cores on 2
    got = slowdown(
        cores=2,
        computing=2,
        inflight=3,
        serving_cpu_ms=10.0,
        nominal_ms=10.0,
        background_cores=0.5,
    )
    assert got == pytest.approx(2.75)


def test_a_second_executor_computing_on_one_core_halves_the_speed() -> None:
    plain = _run({})
    # each request: cold load 5 ms, prefill 2 + 0.5 x 4 = 4, two decodes of 3 + 1 = 4
    assert plain.metrics.ttft_ms.tolist() == [9.0, 9.0]
    assert plain.metrics.e2e_ms.tolist() == [17.0, 17.0]
    shared = _run({"cores": 1})
    # r0 starts alone (1 computing on 1 core); r1 (t=1) finds exec-0 computing until 17: 2 on
    # 1 core, so its load (CPU work on a CPU host), prefill and decodes take twice as long
    assert shared.metrics.ttft_ms.tolist() == [9.0, 10.0 + 8.0]
    assert shared.metrics.e2e_ms.tolist() == [17.0, 10.0 + 8.0 + 16.0]
    assert shared.metrics.gpu_ms_total == pytest.approx(12.0 + 24.0)  # billed as measured
    # with two cores the two executors do not slow each other
    assert _run({"cores": 2}).metrics.e2e_ms.tolist() == [17.0, 17.0]


def test_the_serving_path_takes_cores_and_is_slowed_too() -> None:
    # cores 2, 24 ms of serving CPU per request over its uncontended 12 ms (prefill and
    # decodes): r0 alone needs 1 + 24 / 12 = 3 cores on 2 -> x 1.5; r1 finds exec-0 computing
    # and 2 requests in flight: 2 + 2 x 2 = 6 cores on 2 -> x 3 (its 5 ms load too)
    sim = _run({"cores": 2, "serving_cpu_ms": 24.0})
    assert sim.metrics.ttft_ms.tolist() == [7.5 + 6.0, 15.0 + 12.0]
    assert sim.metrics.e2e_ms.tolist() == [7.5 + 18.0, 15.0 + 36.0]
    # the serving path's own latency (1 ms, now in the uncontended 13 ms) is stretched too
    slow = _run({"cores": 2, "serving_cpu_ms": 24.0}, serving=1.0)
    r0 = (1.0 + 24.0 / 13.0) / 2.0
    r1 = (2.0 + 2.0 * 24.0 / 13.0) / 2.0
    assert slow.metrics.ttft_ms.tolist() == pytest.approx([10.0 * r0, 10.0 * r1])


@pytest.mark.parametrize(
    "host, needle",
    [
        ({"cores": -1}, ">= 0"),
        ({"cores": 1.5}, "expected an integer"),
        ({"serving_cpu_ms": -2.0}, ">= 0"),
        ({"background_cores": float("nan")}, "finite"),
        ({"threads": 4}, "unknown keys"),
    ],
)
def test_bad_host_values_are_refused(host: dict[str, Any], needle: str) -> None:
    with pytest.raises(SimConfigError, match="host") as e:
        parse_config({"host": host})
    assert needle in str(e.value)


def _paced(**over: Any) -> dict[str, Any]:
    paced = {
        "serving_cpu_ms_per_request": 12.5,
        # executor_loop is the executor's event loop, a part of executor: not counted twice
        "idle_cpu_ms_per_s": {
            "gateway": 10.0,
            "scheduler": 15.0,
            "executor": 25.0,
            "executor_loop": 25.0,
        },
    }
    return {"benchmark": "paced", "serving_ms": 6.25, "paced": paced, **over}


def test_paced_bench_sets_the_serving_path_and_the_host(tmp_path: Path) -> None:
    path = tmp_path / "paced.json"
    path.write_text(json.dumps(_paced()))
    assert serving_ms(path) == 6.25
    assert paced_host(path) == {"serving_cpu_ms": 12.5, "background_cores": 0.05}
    cfg = calibrated(
        parse_config({"costs": {"bench_serving_json": str(path)}, "host": {"cores": 2}})
    )
    assert cfg.costs.serving_ms == 6.25
    assert (cfg.host.cores, cfg.host.serving_cpu_ms, cfg.host.background_cores) == (2, 12.5, 0.05)


def test_a_serving_bench_sets_no_host_and_bad_paced_files_are_refused(tmp_path: Path) -> None:
    serving = tmp_path / "serving.json"
    serving.write_text(
        json.dumps({"sdk_stream": {"first_token_p50_ms": 9.0}, "engine": {"seconds": 0.1}})
    )
    assert paced_host(serving) is None
    bad_files: list[tuple[dict[str, Any], str]] = [
        ({"benchmark": "paced"}, "serving_ms"),
        (_paced(serving_ms=-1.0), ">= 0"),
        (_paced(paced={}), "serving_cpu_ms_per_request"),
        (_paced(paced={"serving_cpu_ms_per_request": 1.0, "idle_cpu_ms_per_s": 3}), "paced"),
        (
            _paced(paced={"serving_cpu_ms_per_request": -1.0, "idle_cpu_ms_per_s": {}}),
            ">= 0",
        ),
    ]
    for bad, needle in bad_files:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(SimConfigError, match=needle):
            serving_ms(path)
            paced_host(path)
