"""`vajra bench bus` in a short form: it runs end to end and writes every figure it promises.

Speeds are not asserted here (tests must pass on a loaded machine); the benchmark's own runs
are quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_bus_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "bus.json"
    cmd = [sys.executable, "-m", "vajra", "bench", "bus", "--json", str(out)]
    cmd += ["--duration", "0.5", "--concurrency", "16", "--latency-requests", "50"]
    subprocess.run(cmd, check=True, timeout=240, capture_output=True)
    result = json.loads(out.read_text())
    for key in ("requests_per_s", "p50_ms", "p99_ms", "raw_requests_per_s", "ratio_to_raw"):
        assert result[key] > 0, key
    assert result["errors"] == 0
    cpu = result["cpu_us_per_request"]
    # Every process of the cluster shows up (a short run may round a small share down to 0).
    for name in ("gateway", "scheduler", "executor", "ledger", "predictor", "valkey-server"):
        assert cpu[name] >= 0, (name, cpu)
    assert cpu["load_generator"] > 0 and cpu["gateway"] > 0
