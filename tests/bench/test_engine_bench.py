"""`vajra bench engine --quick`: it runs end to end and writes every section it promises.

Speeds and speed ratios are not asserted (tests must pass on a loaded machine); the
benchmark's own runs are quoted in docs/benchmarks.md. The figures checked are those that hold
however slow the machine: positive rates, p99 at least p50, no errors, every request finished.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from vajra.bench.engine_report import section_errors


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "engine.json"
    cmd = [sys.executable, "-m", "vajra", "bench", "engine", "--json", str(out), "--quick"]
    cmd += ["--decode-graphs", "eager"]  # the CUDA graphs' static path, uncaptured on the CPU
    cmd += ["--adapter-pairs", "2"]  # (g): two alternating pairs per count, medians reported
    proc = subprocess.run(cmd, timeout=280, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "(a) in flight" in proc.stdout  # the short table
    loaded: dict[str, Any] = json.loads(out.read_text())
    return loaded


def _ordered(entry: dict[str, Any], low: str, high: str) -> None:
    assert entry[low] is not None and entry[high] is not None, (low, high, entry)
    assert 0 <= entry[low] <= entry[high], (low, high, entry)


def test_no_section_failed(result: dict[str, Any]) -> None:
    assert section_errors(result) == []
    for key in "abcdefg":
        assert any(k.startswith(f"{key}_") and result[k] is not None for k in result), key
    assert result["meta"]["seconds"] > 0
    assert "partial" not in result  # the whole result replaced the partial ones


def test_a_every_level_finishes_its_requests(result: dict[str, Any]) -> None:
    levels = result["a_concurrency"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 8, 32, 128]
    for lv in levels:
        assert lv["errors"] == 0 and not lv["cut_short"], lv
        assert lv["finished"] == lv["requests"] > 0
        assert lv["output_tokens"] > 0 and lv["output_tok_s"] > 0
        _ordered(lv, "itl_p50_ms", "itl_p99_ms")
        _ordered(lv, "ttft_p50_ms", "ttft_p99_ms")
        assert 0 < lv["mean_in_flight"] <= lv["concurrency"] + 1e-6


def test_b_c_e_run_on_both_engines(result: dict[str, Any]) -> None:
    for kind in ("current", "baseline"):
        contexts = result["b_context"][kind]["contexts"]
        assert [c["context"] for c in contexts] == [128, 512]
        assert all(c["step_p50_ms"] > 0 for c in contexts)
        # The floor: weights plus every row's KV, over a copy bandwidth measured in the run.
        assert result["b_context"][kind]["bandwidth_gb_s"] > 0
        floors = [c["floor_ms"] for c in contexts]
        assert 0 < floors[0] < floors[1]  # more context, more KV to read
        for c in contexts:
            assert c["vs_floor"] == pytest.approx(c["step_p50_ms"] / c["floor_ms"], rel=0.02)
            # the profiled steps: time in ops, and how many ran (on the CPU, torch ops)
            assert c["ops_ms_per_step"] > 0 and c["ops_per_step"] >= 50
        # --decode-graphs eager: the current engine's pure decode steps took the graphs' static
        # path, and as many more ran without it (the control a GPU run compares against).
        stats = result["b_context"][kind].get("decode_graphs")
        if kind == "current":
            assert stats["eager"] >= 4 * len(contexts) and stats["captured"] == 0
            for c in contexts:
                assert c["eager_step_p50_ms"] > 0
                assert c["outside_model_ms"] > 0  # the steps with the model skipped
                assert c["graph_speedup"] == pytest.approx(
                    c["eager_step_p50_ms"] / c["step_p50_ms"], rel=0.05
                )
        else:
            assert stats is None and "graph_speedup" not in contexts[0]
            assert "outside_model_ms" not in contexts[0]
        c = result["c_prefill_interference"][kind]
        assert c["ttft_p50_ms"] > 0
        _ordered(c, "itl_before_p50_ms", "itl_before_p99_ms")
        _ordered(c, "itl_during_p50_ms", "itl_during_p99_ms")
        e = result["e_prefix_cache"][kind]
        assert e["output_tok_s"] > 0 and 0 < e["shared_prompt_token_fraction"] < 1
        assert e["hit_rate"] is None or 0 <= e["hit_rate"] <= 1


def test_d_kv_memory_where_the_engine_reports_it(result: dict[str, Any]) -> None:
    d = result["d_kv_memory"]
    assert set(d["current_by_concurrency"]) == {"1", "8", "32", "128"}
    baseline = d["f_baseline"]  # the baseline engine reports its padded cache
    assert baseline["peak"]["allocated_bytes"] > 0
    assert 0 < baseline["live_fraction_mean"] <= 1
    for kv in [*d["current_by_concurrency"].values(), d["f_current"]]:
        if kv is not None and kv["live_fraction_mean"] is not None:
            assert 0 < kv["live_fraction_mean"] <= 1


def test_f_compares_four_systems(result: dict[str, Any]) -> None:
    f = result["f_comparison"]
    for system in ("static_generate", "transformers_cb", "baseline", "current"):
        assert f[system]["output_tok_s"] > 0, system
    assert f["current"]["errors"] == 0 and f["baseline"]["errors"] == 0
    assert f["current_vs_baseline"] > 0 and f["current_vs_static_generate"] > 0


def test_g_adapters_against_base(result: dict[str, Any]) -> None:
    rows = result["g_adapters"]["results"]
    assert [r["adapters"] for r in rows] == [8, 16]
    for r in rows:
        assert r["errors"] == 0 and not r["cut_short"], r
        assert r["base_tok_s"] > 0 and r["adapters_tok_s"] > 0
        assert 0 < r["weights_bound_vs_base"] < 1
        assert r["pairs"] == len(r["pairs_vs_base"]) == 2 and min(r["pairs_vs_base"]) > 0
        assert r["adapters_vs_base"] == pytest.approx(sum(r["pairs_vs_base"]) / 2)  # the median
    # Ranks cycle 8, 16, 32, 64 over the adapters: the first 16 weigh twice the first 8.
    assert rows[1]["adapter_bytes"] == 2 * rows[0]["adapter_bytes"] > 0
    assert rows[1]["weights_bound_vs_base"] < rows[0]["weights_bound_vs_base"]
