"""ProvisionNewGPU in the simulator: ``cluster.max_executors`` lets the same provisioner the
scheduler runs (vajra.policies.provisioning) start GPUs when no executor has room; each joins
``executor_start_ms`` later, empty, and is paid from then on.

Pure CPU; every run simulates at most a few thousand requests.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from simulations.config import SimConfigError, parse_config
from simulations.run import simulate
from tests.simulations.test_sim_engine import _small

OVERLOAD: dict[str, dict[str, object]] = {
    "trace": {"rate_per_s": 400.0, "output_tokens": 64},
    "cluster": {"executors": 1, "max_batch_size": 2, "max_queue": 2},
    "run": {"max_wait_ms": 2_000.0, "retry_every_ms": 100.0},
}


def _run(**cluster: object) -> dict[str, Any]:
    sections = {k: dict(v) for k, v in OVERLOAD.items()}
    sections["cluster"].update(cluster)
    return simulate(parse_config(_small(**sections)))


@pytest.mark.parametrize("placement", ["vajra", "least-loaded", "random"])
def test_an_overloaded_cluster_grows_to_its_max_and_refuses_less(placement: str) -> None:
    fixed = _run()
    grown = simulate(
        parse_config(
            _small(
                **{k: dict(v) for k, v in OVERLOAD.items() if k != "cluster"},
                cluster={**OVERLOAD["cluster"], "max_executors": 6, "executor_start_ms": 500.0},
                policy={"placement": placement},
            )
        )
    )
    f = fixed["executors"]
    assert (f["initial"], f["final"], f["started"], f["joined_ms"]) == (1, 1, 0, [])
    assert f["gpu_hours"] == pytest.approx(fixed["span_ms"] / 3_600_000, abs=1e-3)
    ex = grown["executors"]
    assert ex["initial"] == 1 and ex["final"] == 6
    # One start at a time: each joins at least executor_start_ms after the one before.
    joined = ex["joined_ms"]
    assert all(b - a >= 500.0 for a, b in itertools.pairwise(joined))
    assert grown["errors"].get("no_capacity", 0) < fixed["errors"]["no_capacity"]
    assert grown["completed"] + sum(grown["errors"].values()) == grown["requests"]
    # Paid from when each joined: less than six GPUs for the whole span, more than one.
    span_h = grown["span_ms"] / 3_600_000
    assert span_h < ex["gpu_hours"] < 6 * span_h
    eco = grown["economics"]["vajra"]
    assert eco["gpus"] == 6 and eco["cost_usd"] > 0


def test_no_growth_without_pressure_or_past_the_max() -> None:
    calm = simulate(parse_config(_small(cluster={"max_executors": 10})))
    assert calm["errors"] == {} and calm["executors"]["final"] == 3  # room all along
    capped = _run(max_executors=1)  # not above `executors`: no provisioning
    assert capped["executors"]["final"] == 1


def test_bad_provisioning_settings_are_refused() -> None:
    with pytest.raises(SimConfigError, match="max_executors"):
        parse_config(_small(cluster={"max_executors": -1}))
    with pytest.raises(SimConfigError, match="executor_start_ms"):
        parse_config(_small(cluster={"executor_start_ms": -5.0}))


def _burst_trace() -> Any:
    from tests.simulations.test_sim_engine import _trace

    # Two bursts of 40 requests 60 s apart, spread over 8 adapters.
    rows = [(t0 + 5.0 * i, i % 8, 4, 8) for t0 in (0.0, 60_000.0) for i in range(40)]
    return _trace(rows, adapters=8)


def _burst_sim(idle_stop_ms: float) -> Any:
    from simulations.cluster import build_executors
    from simulations.engine import Simulator
    from simulations.placement import PolicyPlacement

    cfg = parse_config(
        {
            "run": {"max_wait_ms": 30_000.0, "retry_every_ms": 50.0},
            "cluster": {
                "executors": 1, "max_batch_size": 2, "max_queue": 2, "gpu_slots": 8,
                "adapter_bytes": 1_000_000, "max_executors": 4, "executor_start_ms": 100.0,
                "idle_stop_ms": idle_stop_ms,
            },
            "costs": {"prefill_ms_base": 2.0, "decode_ms_base": 10.0},
        }
    )  # fmt: skip
    exs = build_executors(cfg.cluster)
    sim = Simulator(cfg, _burst_trace(), exs, PolicyPlacement(exs, base_model="base", alpha=0.5,
                    beta=0.3, gamma=0.2))  # fmt: skip
    sim.run()
    return sim.summary(), sim


def test_idle_provisioned_gpus_leave_and_come_back_for_the_next_burst() -> None:
    kept, _ = _burst_sim(0.0)
    stopped, sim = _burst_sim(1_000.0)
    assert kept["completed"] == stopped["completed"] == 80 and stopped["errors"] == {}
    k, s = kept["executors"], stopped["executors"]
    assert k["retired_ms"] == [] and k["final"] == k["started"] + 1 == 4
    # Each burst grows the cluster; the quiet minute between them sends the started GPUs away.
    assert s["started"] > 3 and s["max_serving"] == 4
    assert len(s["retired_ms"]) >= 3 and s["final"] < s["started"] + 1
    assert all(t < 60_000.0 for t in s["retired_ms"])  # during the quiet minute
    assert sum(t > 60_000.0 for t in s["joined_ms"]) >= 3  # the second burst starts them again
    # Paid only while there: fewer GPU-hours than keeping them.
    assert s["gpu_hours"] < k["gpu_hours"]
    # The executor the run started with never leaves; a retired one is never placed on again.
    assert sim.executors[0].retired_ms == float("inf")
    for ex in sim.executors[1:]:
        if ex.retired_ms < float("inf"):  # it left only after idle_stop_ms without a request
            assert ex.idle_since_ms is not None
            assert ex.retired_ms - ex.idle_since_ms >= 1_000.0
