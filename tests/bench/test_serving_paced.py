"""`vajra bench paced` in its short form: one quick run through the CLI (about 20 s on two
cores), whose JSON every test below reads; it must hold every figure the module promises.

Speeds are not asserted (tests must pass on a loaded machine), only shapes and the arithmetic
between figures. CPU time is counted in clock ticks, so a process may show 0 in a short run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vajra.cli import main

SUMMARY_KEYS = {"p50", "p90", "p99", "max", "mean", "n"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``vajra bench paced --quick`` once: the JSON it wrote."""
    out = tmp_path_factory.mktemp("paced") / "out" / "paced.json"
    assert main(["bench", "paced", "--quick", "--json", str(out)]) == 0
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_cli_writes_the_quick_run_with_its_conditions(quick_run: dict[str, Any]) -> None:
    assert quick_run["benchmark"] == "paced"
    conditions = quick_run["conditions"]
    assert conditions["quick"] is True
    assert (conditions["requests"], conditions["adapters"], conditions["rounds"]) == (20, 4, 1)
    assert conditions["gap_ms"] == 43.0  # kept by quick
    assert (conditions["max_tokens"], conditions["prompt_tokens"]) == (8, 64)
    assert conditions["how"].startswith("run_paced_bench(requests=20, gap_ms=43.0")


def test_engine_figures_are_positive_and_consistent(quick_run: dict[str, Any]) -> None:
    engine = quick_run["engine_adapters"]
    assert engine["steps"] >= quick_run["conditions"]["max_tokens"]
    assert engine["seconds"] > 0 and engine["first_step_ms"] > 0 and engine["step_ms"] > 0
    assert engine["first_step_ms"] <= engine["seconds"] * 1000
    assert engine["step_ms"] == pytest.approx(engine["seconds"] / engine["steps"] * 1000, 1e-3)


@pytest.mark.parametrize("run", ["paced", "back_to_back"])
def test_latency_summaries(quick_run: dict[str, Any], run: str) -> None:
    figures = quick_run[run]
    n = quick_run["conditions"]["requests"]
    first, e2e = figures["first_token_ms"], figures["e2e_ms"]
    for summary in (first, e2e):
        assert set(summary) == SUMMARY_KEYS and summary["n"] == n
        assert all(summary[k] > 0 for k in SUMMARY_KEYS)
        assert summary["p50"] <= summary["p90"] <= summary["p99"] <= summary["max"]
    for key in ("p50", "p90", "p99", "max", "mean"):
        assert first[key] <= e2e[key], key
    assert figures["seconds"] > 0


def test_paced_run_waits_its_gaps(quick_run: dict[str, Any]) -> None:
    paced = quick_run["paced"]
    assert paced["gap_ms"] == 43.0
    gaps_s = paced["gap_ms"] / 1000 * quick_run["conditions"]["requests"]
    assert paced["seconds"] >= gaps_s
    assert quick_run["back_to_back"]["seconds"] < paced["seconds"]


def test_cpu_figures(quick_run: dict[str, Any]) -> None:
    paced = quick_run["paced"]
    per_request = paced["cpu_ms_per_request"]
    assert {"gateway", "executor", "executor_loop", "load_generator"} <= set(per_request)
    assert all(ms >= 0 for ms in per_request.values())
    assert per_request["executor"] > 0  # it ran the model for every request
    serving = sum(ms for n, ms in per_request.items() if n not in ("executor", "executor_loop"))
    assert paced["serving_cpu_ms_per_request"] > 0
    assert paced["serving_cpu_ms_per_request"] == pytest.approx(serving, abs=0.01)
    idle = paced["idle_cpu_ms_per_s"]
    assert {"gateway", "executor"} <= set(idle) and all(ms >= 0 for ms in idle.values())


def test_serving_ms_is_the_difference_it_claims(quick_run: dict[str, Any]) -> None:
    first_step = quick_run["engine_adapters"]["first_step_ms"]
    for key, run in (("serving_ms", "paced"), ("serving_ms_back_to_back", "back_to_back")):
        p50 = quick_run[run]["first_token_ms"]["p50"]
        assert quick_run[key] == pytest.approx(round(p50 - first_step, 3), abs=1e-9), key


def test_cli_refuses_bad_options_before_running(tmp_path: Path) -> None:
    out = tmp_path / "paced.json"
    assert main(["bench", "paced", "--requests", "0", "--json", str(out)]) == 2
    assert not out.exists()
