"""``vajra bench train --cluster``: the cluster section runs on two real tiny-model clusters
and writes its documented JSON (a very short run; its figures mean little).

Test rules: loopback only; the benchmark's own bounded waits; no timing assertions.
"""

from __future__ import annotations

import pytest

from vajra.bench.train_cluster import run_train_cluster_bench
from vajra.cli import build_parser

RUNS = ("no_job", "preemption_on", "preemption_off")


def test_the_cluster_flag_is_parsed() -> None:
    args = build_parser().parse_args(["bench", "train", "--json", "out.json", "--cluster"])
    assert args.cluster and args.cluster_requests == 128 and args.cluster_concurrency == 4
    assert not build_parser().parse_args(["bench", "train", "--json", "out.json"]).cluster
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "train", "--json", "x", "--cluster-requests", "many"])


@pytest.mark.e2e
def test_cluster_section_measures_three_runs_with_and_without_a_job() -> None:
    result = run_train_cluster_bench(requests=3, concurrency=2, max_tokens=4, rank=4)
    assert result["conditions"] == {
        "requests": 3,
        "concurrency": 2,
        "max_tokens": 4,
        "rank": 4,
        "inference_ratio": 10,
    }
    for name in RUNS:
        run = result[name]
        assert run["requests"] == 3 and run["tokens"] == 3 * 4  # EOS ignored: every token
        assert 0 < run["chunks_per_token"] <= 1 and run["tokens_per_s"] > 0
        chunks = round(run["chunks_per_token"] * run["tokens"])
        # one TTFT per stream, one gap per later chunk
        assert run["ttft_ms"]["n"] == 3 and run["itl_ms"]["n"] == chunks - 3
        assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p99"] <= run["ttft_ms"]["max"]
        assert run["itl_ms"]["p50"] <= run["itl_ms"]["p99"] <= run["itl_ms"]["max"]
    assert "train_steps" not in result["no_job"]
    for name in ("preemption_on", "preemption_off"):
        assert result[name]["train_steps"] >= 0 and result[name]["train_steps_per_s"] >= 0
