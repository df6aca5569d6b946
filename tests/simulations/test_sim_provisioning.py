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
    assert fixed["executors"] == {"initial": 1, "final": 1, "gpu_hours": pytest.approx(
        fixed["span_ms"] / 3_600_000, abs=1e-3), "joined_ms": []}  # fmt: skip
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
