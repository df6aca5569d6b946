"""`vajra bench decode-kernel`: its quick form in Triton's interpreter, its sweep and refusals.

Speeds are not asserted (the interpreter is not the GPU); the JSON's parts and the kernel's
errors against the reference are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vajra.bench.decode_kernel import sweep
from vajra.gpu.paged_decode_kernel import LaunchPlan

REPO = Path(__file__).resolve().parent.parent.parent


def run_bench(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    out = tmp_path / "dk.json"
    args = ["--json", str(out), "--device", "cpu", "--shapes", "tiny", "--quick"]
    args += ["--repeats", "1", "--table-positions", "1024", "--dtype", "float32"]
    return subprocess.run(
        [sys.executable, "-m", "vajra", "bench", "decode-kernel", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_quick_run_in_the_interpreter_writes_every_case(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    done = run_bench(tmp_path, {**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "dk.json").read_text())
    assert result["interpreted"] is True and result["bench"] == "decode-kernel"
    assert "partial" not in result  # the whole result replaced the partial ones
    cases = result["shapes"]["tiny"]
    assert [(c["rows"], c["context"]) for c in cases] == [(3, 40), (2, 100)]
    for case in cases:
        plans = case["plans"]
        assert sum(p["auto"] for p in plans) == 1
        assert all(p["max_error"] <= 1e-4 for p in plans), plans
        assert case["best"]["ms"] == min(p["ms"] for p in plans)
        # a 1,024-position table takes the several-split path (here with empty splits)
    assert any(p["splits"] > 1 for p in cases[1]["plans"] if p["auto"])


def test_without_cuda_or_the_interpreter_it_says_why(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = run_bench(tmp_path, env)
    assert done.returncode != 0
    assert "needs CUDA and triton" in done.stderr
    assert not (tmp_path / "dk.json").exists()


def test_sweep_holds_the_chosen_plan_its_neighbours_and_the_first_form_once() -> None:
    auto = LaunchPlan(splits=4, tile=32, num_warps=4)
    plans = sweep(auto)
    assert len(plans) == len(set(plans))
    assert auto in plans and plans[-1] == LaunchPlan(1, 16, 4)
    assert {p.splits for p in plans} == {1, 2, 4, 8, 16}
    assert LaunchPlan(4, 32, 8) in plans and LaunchPlan(4, 64, 4) in plans
