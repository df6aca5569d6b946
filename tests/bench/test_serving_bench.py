"""`vajra bench serving` in its short form: it runs end to end and writes every figure it promises.

Speeds are not asserted here (tests must pass on a loaded machine); the benchmark's own runs
are quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SDK_RUNS = ("sdk_stream", "sdk_infer", "sdk_stream_adapters_registered", "sdk_stream_adapters")


def test_bench_serving_quick_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    cmd = [sys.executable, "-m", "vajra", "bench", "serving", "--quick", "--json", str(out)]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "serving"
    conditions = result["conditions"]
    assert conditions["quick"] is True and conditions["requests"] == 32
    requests, max_tokens = conditions["requests"], conditions["max_tokens"]
    assert result["static"]["tokens"] == requests * max_tokens
    for run in ("static", "engine", "engine_adapters", *SDK_RUNS):
        figure = result[run]
        assert figure["tokens_per_s"] > 0 and figure["seconds"] > 0, run
        # The model may meet EOS early, so a run produces at most this many tokens.
        assert 0 < figure["tokens"] <= requests * max_tokens, run
    for run in ("engine", "engine_adapters", *SDK_RUNS):
        assert result[run]["ratio"] > 0 and result[run]["static_tokens_per_s"] > 0, run
    for run in SDK_RUNS:
        figure = result[run]
        assert figure["chunks_per_token"] > 0, run
        # CPU time is counted in clock ticks: a short run may show a process at 0.
        assert all(ms >= 0 for ms in figure["cpu_ms_per_round"].values()), run
    assert result["sdk_infer"]["chunks_per_token"] <= 1
    for run in ("sdk_stream", "sdk_stream_adapters_registered", "sdk_stream_adapters"):
        assert result[run]["first_token_p50_ms"] > 0, run
