"""`make gpu-check` in its dry mode: the whole plan on the CPU, so it cannot rot between GPU runs.

The dry run installs one hand-made wheel offline (as the GPU run installs the downloaded ones),
runs the CUDA tests (which skip without a device), and both adapter benchmarks on the tiny
shape. Speeds are not asserted (tests must pass on a loaded machine); the summary's parts are.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from vajra.bench import gpu_check
from vajra.bench.gpu_check import (
    Options,
    Step,
    _relative_paths,
    judge_engine_targets,
    judge_targets,
    judge_train_targets,
    read_junit,
)

REPO = Path(__file__).resolve().parent.parent.parent
PROBE = "vajra_gpu_check_probe"


def probe_wheel(folder: Path) -> None:
    """A one-module wheel, so the dry run's offline install has something to install."""
    folder.mkdir()
    dist = f"{PROBE}-1.0.dist-info"
    files = {
        f"{PROBE}.py": "CARRIED = True\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(folder / f"{PROBE}-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


@pytest.mark.timeout(600)  # five Python processes that import torch, on a loaded machine
def test_dry_run_runs_the_whole_plan_and_writes_every_json(tmp_path: Path) -> None:
    out, work, wheels = tmp_path / "out", tmp_path / "work", tmp_path / "wheels"
    probe_wheel(wheels)
    (tmp_path / "requirements.txt").write_text(f"{PROBE}\n")
    cmd = [sys.executable, "-m", "vajra.bench.gpu_check", "--dry-run", "--budget-s", "540"]
    cmd += ["--out", str(out), "--work", str(work), "--wheels", str(wheels)]
    cmd += ["--requirements", str(tmp_path / "requirements.txt")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=570)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]

    lines = done.stdout.splitlines()
    assert lines[0].startswith("vajra gpu-check (dry-run) on cpu: python ")
    assert lines[1].startswith("dry run on the CPU: CUDA tests skip themselves")
    assert any(line.startswith("tests (pytest -m gpu tests/gpu): ") for line in lines)
    assert any(line.startswith("adapters-llama-3.2-1b (tiny, ") for line in lines)
    assert any(line.startswith("engine (tok/s at ") for line in lines)
    assert any(
        line.startswith("engine decode step of ") and "x floor, ops " in line and " kernels" in line
        for line in lines
    )
    assert any(line.startswith("fused decoder-layer modules: ") for line in lines)
    assert any(line.startswith("decode kernel tiny 3 rows x 40: ") for line in lines)
    assert any(
        line.startswith("engine with distinct adapters, against base-only: ") for line in lines
    )
    assert any(line.startswith("training: ") and "x PEFT's tokens/s" in line for line in lines)
    assert lines[-1].startswith("result: OK in ")

    names = {"environment", "tests", "adapters-llama-3.2-1b", "adapters-llama-3-8b", "summary"}
    names |= {"engine-llama-3.2-1b", "train-llama-3.2-1b", "decode-kernel"}
    assert {p.name for p in out.iterdir()} == {f"{name}.json" for name in names}
    assert f"{REPO}/" not in (out / "summary.json").read_text()  # the checkout's paths: relative
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry-run" and summary["ok"] is True
    assert [s["name"] for s in summary["steps"]] == [
        "install",
        "environment",
        "tests",
        "decode-kernel",
        "engine-llama-3.2-1b",
        "train-llama-3.2-1b",
        "adapters-llama-3-8b",
        "adapters-llama-3.2-1b",
    ]
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    assert summary["wheels"]["installed"] == [PROBE]
    assert next(work.glob("site-cp*")).joinpath(f"{PROBE}.py").exists()

    environment = json.loads((out / "environment.json").read_text())
    assert environment["device"] == "cpu" and environment["cuda"] is False
    assert environment["import_errors"] == {}

    tests = json.loads((out / "tests.json").read_text())
    assert tests == summary["tests"]
    assert tests["failed"] == 0 and tests["skipped"] >= 1  # every CUDA test skips on the CPU
    assert all("CUDA" in problem["skipped"] for problem in tests["problems"])

    assert summary["targets"].startswith("not judged")
    kernel = summary["decode_kernel"]  # its quick form, in the interpreter
    assert [(k["shape"], k["rows"], k["context"]) for k in kernel] == [
        ("tiny", 3, 40),
        ("tiny", 2, 100),
    ]
    assert all(k["auto_ms"] > 0 and k["best"]["ms"] <= k["auto_ms"] for k in kernel), kernel
    for name in ("adapters-llama-3.2-1b", "adapters-llama-3-8b"):
        figures = summary["figures"][name]
        assert figures["model_shape"] == "tiny" and figures["activation_shape"] == "tiny"
        assert set(figures["activation_p50_ms"]) == {"pinned", "page_cache"}
        assert [row["adapters"] for row in figures["by_adapters"]] == [1, 2]
        one, two = figures["by_adapters"]
        assert one["vajra_vs_base"] > 0 and one["vajra_vs_peft"] > 0, one
        assert two["vajra_vs_base"] > 0 and two["vajra_vs_peft"] is None, two  # PEFT up to 1
        bench = json.loads((out / f"{name}.json").read_text())
        assert bench["device"] == "cpu" and bench["throughput"]["model_shape"] == "tiny"


def test_read_junit_counts_passes_failures_and_skips(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.gpu.a" name="test_ok"/>'
        '<testcase classname="tests.gpu.a" name="test_bad"><failure message="boom"/></testcase>'
        '<testcase classname="tests.gpu.b" name="test_err"><error message="setup"/></testcase>'
        '<testcase classname="tests.gpu.b" name="test_cuda">'
        '<skipped message="needs a CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    result = read_junit(report)
    assert (result["passed"], result["failed"], result["skipped"]) == (1, 2, 1)
    assert result["problems"] == [
        {"test": "tests.gpu.a::test_bad", "message": "boom"},
        {"test": "tests.gpu.b::test_err", "message": "setup"},
        {"test": "tests.gpu.b::test_cuda", "skipped": "needs a CUDA device"},
    ]
    assert read_junit(tmp_path / "missing.xml")["problems"][0]["message"] == "no junit report"


def figures(shape: str, ratios: dict[int, float], pinned_ms: float | None) -> dict[str, Any]:
    tiers = {} if pinned_ms is None else {"pinned": pinned_ms, "page_cache": 9.0}
    rows = [{"adapters": n, "vajra_vs_base": r} for n, r in ratios.items()]
    return {
        "model_shape": shape,
        "activation_shape": "llama-3-8b",
        "activation_p50_ms": tiers,
        "by_adapters": rows,
    }


def test_targets_are_met_missed_or_not_measured() -> None:
    statuses = [t["status"] for t in judge_targets({})]
    assert statuses == ["not measured"] * 3
    run = {"adapters-llama-3.2-1b": figures("llama-3.2-1b", {1: 0.9, 32: 0.8, 128: 0.7}, 1.5)}
    assert [(t["status"], t["value"]) for t in judge_targets(run)] == [
        ("met", 0.8),
        ("missed", 0.7),
        ("met", 1.5),
    ]
    # The first run that measured the 8B adapter's activation counts; a wrong shape is no result.
    run["adapters-llama-3-8b"] = figures("llama-3-8b", {1: 0.5}, 0.5)
    assert judge_targets(run)[2]["value"] == 1.5
    run["adapters-llama-3.2-1b"] = figures("tiny", {32: 0.9, 128: 0.9}, None)
    run["adapters-llama-3-8b"] = figures("llama-3-8b", {1: 0.5}, 2.5)
    assert [(t["status"], t["value"]) for t in judge_targets(run)] == [
        ("not measured", None),
        ("not measured", None),
        ("missed", 2.5),
    ]


def test_the_summary_names_paths_inside_the_checkout_relative_to_it() -> None:
    summary = {
        "command": ["python", "-m", "pytest", "/repo/tests/gpu", "/tmp/out/junit.xml"],
        "wheels": {"folder": "/repo/.gpu-wheels", "installed": ["trio"]},
        "seconds": 1.5,
        "other": "/repository/x",
    }
    assert _relative_paths(summary, "/repo/") == {
        "command": ["python", "-m", "pytest", "tests/gpu", "/tmp/out/junit.xml"],
        "wheels": {"folder": ".gpu-wheels", "installed": ["trio"]},
        "seconds": 1.5,
        "other": "/repository/x",
    }


def test_engine_targets_judge_the_worst_context_and_each_adapter_count() -> None:
    assert [t["status"] for t in judge_engine_targets({})] == ["not measured"] * 3
    contexts = [{"context": 128, "vs_floor": 1.5}, {"context": 4096, "vs_floor": 2.5}]
    engine = {
        "b_context": {"current": {"rows": 32, "contexts": contexts}},
        "g_adapters": {"results": [{"adapters": 32, "adapters_vs_base": 0.9}]},
    }
    judged = judge_engine_targets(engine)
    assert [(t["status"], t["value"]) for t in judged] == [
        ("missed", 2.5),
        ("met", 0.9),
        ("not measured", None),
    ]
    assert "32 rows" in judged[0]["target"]
    contexts[1]["vs_floor"] = 1.9
    engine["g_adapters"]["results"].append({"adapters": 128, "adapters_vs_base": 0.8})
    assert [t["status"] for t in judge_engine_targets(engine)] == ["met", "met", "missed"]


def test_train_targets_judge_the_ratio_and_the_latency_bound() -> None:
    assert [t["status"] for t in judge_train_targets({})] == ["not measured"] * 2
    train = {
        "training": {"ratio": 1.2},
        "latency": {"preemption_on": {"itl_ms": {"p99": 30.0}}, "target_p99_itl_ms": 25.0},
    }
    assert [(t["status"], t["value"]) for t in judge_train_targets(train)] == [
        ("met", 1.2),
        ("missed", 30.0),
    ]
    train["training"]["ratio"] = 0.9
    train["latency"]["target_p99_itl_ms"] = 31.0
    judged = judge_train_targets(train)
    assert [t["status"] for t in judged] == ["missed", "met"]
    assert "(31.0 ms)" in judged[1]["target"]


#: Vajra's dependencies that the GPU machine lacks and ``requirements-gpu.txt`` does not carry.
NOT_ON_THE_GPU_MACHINE = ("zmq", "aiobotocore", "fastapi", "hypercorn", "multipart", "openai")
_COLLECT_WITHOUT = """
import sys, pytest
blocked = set(sys.argv[1].split(","))
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine)")
sys.meta_path.insert(0, Missing())
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"]))
"""


def test_the_cuda_tests_collect_with_only_what_the_gpu_machine_has() -> None:
    """The GPU run imports ``tests/conftest.py`` too: it must not pull in the whole stack."""
    cmd = [sys.executable, "-c", _COLLECT_WITHOUT, ",".join(NOT_ON_THE_GPU_MACHINE)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "test_gpu_training.py::test_bf16_training_on_cuda_follows_float32" in done.stdout


# A step that writes part of its result, then outlives the budget (a GPU run's last step).
_CUT_SHORT = """
import sys, time
from pathlib import Path
from vajra.bench.result_file import write_result
row = {"adapters": 32, "rows": 32, "vajra_tok_s": 900.0, "vajra_vs_base": 0.8, "vajra_vs_peft": None}
part = {"device": "H200", "throughput": {"model_shape": "llama-3.2-1b", "results": [row]}}
write_result(Path(sys.argv[1]), part, partial=True)
print("written", flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(120)
def test_a_step_cut_short_by_the_budget_keeps_the_figures_it_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    name = "adapters-llama-3.2-1b"
    step = Step(name, ("-c", _CUT_SHORT, str(out / f"{name}.json")), timeout_s=600)
    monkeypatch.setattr(gpu_check, "plan", lambda opts: [step])
    out.mkdir()
    leftover = out / f".{name}.json.k9x.tmp"  # the last run's step killed while it wrote
    leftover.write_text('{"device": ')
    opts = Options(
        root=REPO, out=out, work=work, wheels=tmp_path / "none", requirements=tmp_path / "r",
        dry_run=False, budget_s=15,
    )  # fmt: skip
    summary, lines = gpu_check.run_check(opts)
    record = summary["steps"][0]
    assert record["status"] == "timed out" and record["partial_json"] is True, record
    assert "written" in (work / f"{name}.log").read_text()
    assert summary["figures"][name]["by_adapters"][0]["vajra_vs_base"] == 0.8
    assert ("met", 0.8) in [(t["status"], t["value"]) for t in summary["targets"]]
    assert summary["ok"] is False
    assert not leftover.exists()
    assert f"step {name}: timed out: the figures above are those it finished before it ended" in (
        lines
    )
    assert any(line.startswith(f"{name} (llama-3.2-1b, None s): ") for line in lines)
