"""``make gpu-check``: the CUDA tests and the GPU benchmarks as one command for a GPU machine.

One plan, run in order, each step a subprocess with its own time limit inside one budget
(470 s by default, so the whole check ends within 8 minutes on one H100 or H200):

1. ``install``: the wheels that ``make gpu-wheels`` put in ``.gpu-wheels/`` (everything Vajra's
   GPU code, its CUDA tests and the benchmarks need besides torch, transformers, peft and
   safetensors) are installed offline with ``pip --target`` into a folder of their own, which
   goes first on every later step's ``PYTHONPATH``. The machine's packages are not touched.
2. ``environment``: Python, torch, transformers, peft and safetensors versions, the device, and
   an import of every module the later steps need (a missing wheel shows up here, by name).
3. ``tests``: ``pytest -m gpu tests/gpu``, every test marked as needing CUDA (the LoRA pool's
   copy stream from pinned host memory, the engine on CUDA, ...).
4. ``decode-kernel``: ``vajra bench decode-kernel``, the paged decode attention alone by launch
   plan, on the attention of both shapes (the dry run: in Triton's interpreter).
5. ``engine-llama-3.2-1b``: ``vajra bench engine`` on the Llama-3.2-1B shape in bfloat16,
   sections (b) (decode step of 32 rows at 128, 1,024 and 4,096 tokens of context, against
   its memory-bandwidth floor) and (g) (32 and 128 distinct adapters against base-only).
6. ``train-llama-3.2-1b``: ``vajra bench train`` on that shape: training tokens/s against
   PEFT's, and inference latency with no job and with a job, preemption on and off.
7. ``adapters-llama-3-8b``: ``vajra bench adapters`` (run as ``python -m
   vajra.bench.adapters``, which needs no CLI install) on the Llama-3-8B shape: the
   activation target's adapter, and 1 and 8 adapters decoding.
8. ``adapters-llama-3.2-1b``: ``vajra bench adapters`` on the Llama-3.2-1B shape (1, 32 and
   128 adapters, PEFT up to 32), last: the step a short budget cuts.

Every step writes its JSON into one folder (``bench-results/gpu/`` by default), after each
part it finishes, so a step cut short by its time limit still gives the figures it measured
(its JSON says ``"partial": true``, its record ``"partial_json": true``). ``summary.json``
gathers them; a short summary goes to stdout, progress and failing steps' logs to stderr.
The exit status is 1 when a step fails, a test fails, or a CUDA test is skipped on
a GPU machine.

``--dry-run`` runs the same plan on the CPU: the CUDA tests skip themselves, the "tiny" model
shape stands in for both GPU shapes, and the speed targets are not judged; the summary says so.
``tests/bench/test_gpu_check.py`` runs it, so the check cannot rot between GPU runs.

Standard library only (with :mod:`vajra.bench.result_file`, itself standard library only):
this module runs before the wheels are installed.
"""

# Over 400 lines: the check must be one standard-library module, runnable before any wheel
# is installed on the GPU machine; plan, run, summary and targets are read together.

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vajra.bench.result_file import is_partial, remove_temporaries

#: Modules every step after ``install`` imports; the environment step checks each.
NEEDED_MODULES = (
    "vajra.gpu",
    "vajra.gpu.lora",
    "vajra.state",
    "vajra.bench.adapters",
    "vajra.bench.engine",
    "llguidance",
    "pytest",
    "pytest_trio",
    "pytest_timeout",
    "hypothesis",
)
#: pytest plugins named explicitly: autoloading is off, so plugins the machine happens to
#: have (pytest-benchmark, pytest-cov, ...) cannot break a run.
PYTEST_PLUGINS = ("pytest_trio.plugin", "pytest_timeout", "_hypothesis_pytestplugin")
#: The speed targets judged on a GPU run (see docs/benchmarks.md).
TARGET_MIN_VAJRA_VS_BASE = 0.75  # Llama-3.2-1B shape, at 32 and 128 adapters
TARGET_MAX_PINNED_ACTIVATION_MS = 2.0  # Llama-3-8B-shaped rank-16 adapter, p50
TARGET_MAX_VS_FLOOR = 2.0  # engine (b): decode step over its bandwidth floor, every context
TARGET_MIN_ENGINE_ADAPTERS_VS_BASE = 0.85  # engine (g), at 32 and 128 adapters

_ENVIRONMENT = """
import importlib, json, platform, sys
out = {"python": platform.python_version()}
for name in ("torch", "transformers", "peft", "safetensors"):
    out[name] = importlib.import_module(name).__version__
import torch
out["cuda"] = torch.cuda.is_available()
out["device"] = torch.cuda.get_device_name(0) if out["cuda"] else "cpu"
errors = {}
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"
out["import_errors"] = errors
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=2)
sys.exit(1 if errors else 0)
"""


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple[str, ...]  # after ``python``
    timeout_s: float
    env: tuple[tuple[str, str], ...] = ()  # set for this step alone


@dataclass(frozen=True)
class Options:
    root: Path  # the repository checkout (holds tests/gpu)
    out: Path  # every JSON goes here
    work: Path  # logs, the pip target folder, pytest's junit XML
    wheels: Path
    requirements: Path
    dry_run: bool
    budget_s: float


def adapters_bench_args(shape: str, out: Path, *, dry_run: bool) -> list[str]:
    """``vajra bench adapters`` for one model shape; the dry run uses the tiny shape, on the
    CPU, with the smallest settings that still run every part (activation, Vajra, PEFT)."""
    args = ["-m", "vajra.bench.adapters", "--json", str(out)]
    if dry_run:
        settings = "--device cpu --model-shape tiny --activation-shape tiny --counts 1,2"
        settings += " --batch-size 2 --new-tokens 2 --repeats 1 --activation-repeats 2"
        return args + settings.split() + ["--peft-max-adapters", "1"]
    args += f"--model-shape {shape} --activation-shape {shape} --activation-repeats 10".split()
    if shape == "llama-3.2-1b":
        # One timed run each, PEFT up to 32 adapters: on an H200 (2026-11-28, seventh session)
        # PEFT had not loaded 128 adapters after 116 s.
        return [*args, "--counts", "1,32,128", "--repeats", "1", "--peft-max-adapters", "32"]
    # 8B: few adapters (the bench builds each, 168 MB in float32, on the CPU first) and no
    # PEFT comparison; 1 and 8 adapters took 41 s in all on an H200 (2026-11-28).
    return [*args, "--counts", "1,8", "--repeats", "1", "--no-peft"]


def plan(opts: Options) -> list[Step]:
    pytest = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
    pytest += ["--junitxml", str(opts.work / "junit.xml")]
    for plugin in PYTEST_PLUGINS:
        pytest += ["-p", plugin]
    probe = ["-c", _ENVIRONMENT, str(opts.out / "environment.json"), *NEEDED_MODULES]
    steps = [
        Step("environment", tuple(probe), 120),
        Step("tests", (*pytest, "-m", "gpu", "tests/gpu"), 180),
        decode_kernel_step(opts),
    ]
    # Most informative per second first: the engine's (b) and (g) carry the GPU targets, the
    # 8B run the activation target; the 1B adapters run, the longest (PEFT), comes last and
    # is the one a short budget cuts.
    engine_out = opts.out / "engine-llama-3.2-1b.json"
    engine = Step("engine-llama-3.2-1b", tuple(engine_bench_args(engine_out, opts)), 260)
    steps.append(engine)
    train_out = opts.out / "train-llama-3.2-1b.json"
    steps.append(Step("train-llama-3.2-1b", tuple(train_bench_args(train_out, opts)), 150))
    for shape, limit_s in (("llama-3-8b", 120), ("llama-3.2-1b", 240)):
        json_out = opts.out / f"adapters-{shape}.json"
        bench = adapters_bench_args(shape, json_out, dry_run=opts.dry_run)
        steps.append(Step(f"adapters-{shape}", tuple(bench), limit_s))
    return steps


def decode_kernel_step(opts: Options) -> Step:
    """``vajra bench decode-kernel`` (the paged decode attention by launch plan, both shapes);
    the dry run is its quick form in Triton's interpreter, on the CPU."""
    args = ["-m", "vajra.bench.decode_kernel", "--json", str(opts.out / "decode-kernel.json")]
    if not opts.dry_run:
        return Step("decode-kernel", tuple(args), 90)
    quick = "--quick --device cpu --shapes tiny --repeats 1 --dtype float32"
    interpreter = (("TRITON_INTERPRET", "1"),)
    return Step("decode-kernel", (*args, *quick.split()), 90, env=interpreter)


def train_bench_args(out: Path, opts: Options) -> list[str]:
    """``vajra bench train`` on the Llama-3.2-1B shape (its quick form on the CPU when dry)."""
    args = ["-m", "vajra.bench.train", "--json", str(out)]
    if opts.dry_run:
        return [*args, "--quick", "--device", "cpu", "--shape", "tiny"]
    return [*args, "--device", "cuda", "--shape", "llama-3.2-1b", "--steps", "10"]


def engine_bench_args(out: Path, opts: Options) -> list[str]:
    """``vajra bench engine`` on the Llama-3.2-1B shape in bf16, bounded for the GPU budget;
    the dry run is its quick form on the tiny shape, on the CPU."""
    args = ["-m", "vajra.bench.engine", "--json", str(out)]
    if opts.dry_run:
        return [*args, "--quick", "--device", "cpu", "--model-shape", "tiny"]
    # (b) and (g) only, the sections with GPU targets: on an H200 (2026-11-28) (b) at three
    # contexts took 23 s and (g) at 256 and 512 requests 138 s; (g) runs half as many.
    settings = "--model-shape llama-3.2-1b --skip a,c,d,e,f --contexts 128,1024,4096"
    settings += " --context-rows 32 --adapter-counts 32,128 --concurrency 32,128"
    settings += " --requests 128,256"
    settings += " --max-prompt-tokens 1024 --max-output-tokens 64"
    return args + settings.split()


def site_dir(work: Path) -> Path:
    return work / f"site-cp{sys.version_info.major}{sys.version_info.minor}"


def install_step(opts: Options) -> Step | None:
    """Offline install of the downloaded wheels, or None when there are none to install."""
    if not opts.wheels.is_dir() or not any(opts.wheels.glob("*.whl")):
        return None
    args = ["-m", "pip", "install", "--quiet", "--no-index", "--no-compile"]
    args += ["--find-links", str(opts.wheels), "--target", str(site_dir(opts.work))]
    args += ["-r", str(opts.requirements)]
    return Step("install", tuple(args), 180)


def run_step(step: Step, opts: Options, env: dict[str, str], deadline: float) -> dict[str, Any]:
    """Run one step as a subprocess of this Python, its output in ``<work>/<name>.log``."""
    record: dict[str, Any] = {"name": step.name, "command": ["python", *step.args]}
    if step.args[:2] == ("-c", _ENVIRONMENT):
        record["command"] = ["python", "-c", "<environment probe>", *step.args[2:]]
    # Per-step limits guard a GPU run's budget; a dry run on a loaded CPU gets the whole budget.
    left = deadline - time.monotonic()
    timeout = left if opts.dry_run else min(step.timeout_s, left)
    if timeout < 5:
        print(f"[gpu-check] {step.name}: skipped, the time budget is spent", file=sys.stderr)
        return {**record, "status": "skipped", "reason": "time budget spent"}
    log = opts.work / f"{step.name}.log"
    print(f"[gpu-check] {step.name}: running (limit {timeout:.0f} s)", file=sys.stderr, flush=True)
    started = time.monotonic()
    with log.open("wb") as sink:
        try:
            code = subprocess.run(
                [sys.executable, *step.args],
                cwd=opts.root,
                env={**env, **dict(step.env)},
                stdout=sink,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            ).returncode
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = None, "timed out"
    record |= {
        "status": status,
        "returncode": code,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(f"[gpu-check] {step.name}: {status} in {record['seconds']} s", file=sys.stderr)
    if status != "ok":
        tail = log.read_text(errors="replace").splitlines()[-40:]
        record["log_tail"] = tail
        print("\n".join(f"    {line}" for line in tail), file=sys.stderr, flush=True)
    return record


def read_junit(path: Path) -> dict[str, Any]:
    """Counts and failures from pytest's junit XML."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    problems: list[dict[str, str]] = []
    if not path.exists():
        return {**counts, "problems": [{"test": "(pytest)", "message": "no junit report"}]}
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next(
            (child for child in case if child.tag in ("failure", "error", "skipped")), None
        )
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            problems.append({"test": test, "skipped": outcome.get("message", "")})
        else:
            counts["failed"] += 1
            problems.append({"test": test, "message": (outcome.get("message") or "")[:500]})
    return {**counts, "problems": problems}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _figures(result: dict[str, Any]) -> dict[str, Any]:
    """The key figures of one ``vajra bench adapters`` result."""
    activation = result.get("activation", {})
    throughput = result.get("throughput", {})
    return {
        "device": result.get("device"),
        "model_shape": throughput.get("model_shape"),
        "activation_shape": activation.get("shape"),
        "activation_p50_ms": {
            tier: figures.get("p50_ms") for tier, figures in activation.get("tiers", {}).items()
        },
        "by_adapters": [
            {
                key: row.get(key)
                for key in ("adapters", "rows", "vajra_tok_s", "vajra_vs_base", "vajra_vs_peft")
            }
            for row in throughput.get("results", [])
        ],
        "seconds": result.get("seconds"),
    }


def decode_kernel_figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per case of ``vajra bench decode-kernel``: the chosen plan's time, its share
    of the copy bandwidth, the best plan, and its speed-up on one split and on torch."""
    figures = []
    for shape, cases in (result.get("shapes") or {}).items():
        for case in cases:
            chosen: dict[str, Any] = next((p for p in case.get("plans", []) if p["auto"]), {})
            figures.append({
                "shape": shape, "rows": case.get("rows"), "context": case.get("context"),
                "auto_ms": chosen.get("ms"), "vs_bandwidth": chosen.get("vs_bandwidth"),
                "best": case.get("best"),
                "vs_one_split": case.get("auto_speedup_vs_one_split"),
                "vs_reference": case.get("auto_speedup_vs_reference"),
            })  # fmt: skip
    return figures


def _target(text: str, value: float | None, met: bool) -> dict[str, Any]:
    status = "not measured" if value is None else "met" if met else "missed"
    return {"target": text, "value": value, "status": status}


def judge_engine_targets(engine: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets on ``vajra bench engine``'s (b) and (g) (issue "A production decode engine")."""
    b = (engine.get("b_context") or {}).get("current") or {}
    ratios = [e["vs_floor"] for e in b.get("contexts", []) if "vs_floor" in e]
    worst = max(ratios) if ratios else None
    text = f"engine (b), {b.get('rows')} rows decoding: step p50 <= {TARGET_MAX_VS_FLOOR} x "
    text += "its bandwidth floor at every context"
    targets = [_target(text, worst, (worst or 0.0) <= TARGET_MAX_VS_FLOOR)]
    g = engine.get("g_adapters") or {}
    by_count = {r["adapters"]: r.get("adapters_vs_base") for r in g.get("results", [])}
    for n in (32, 128):
        value = by_count.get(n)
        text = f"engine (g), {n} adapters: >= {TARGET_MIN_ENGINE_ADAPTERS_VS_BASE} x base-only"
        targets.append(_target(text, value, (value or 0.0) >= TARGET_MIN_ENGINE_ADAPTERS_VS_BASE))
    return targets


def judge_train_targets(train: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of ``vajra bench train`` (issue "Fine-tuning on the shared frozen core")."""
    training, latency = train.get("training") or {}, train.get("latency") or {}
    ratio = training.get("ratio")
    targets = [_target("training tokens/s >= 1.0 x PEFT's", ratio, (ratio or 0.0) >= 1.0)]
    p99 = ((latency.get("preemption_on") or {}).get("itl_ms") or {}).get("p99")
    bound = latency.get("target_p99_itl_ms")
    text = "inference p99 ITL with a job, preemption on <= no-job p99 + one micro-step"
    text += f" ({bound} ms)" if bound is not None else ""
    met = p99 is not None and bound is not None and p99 <= bound
    targets.append(_target(text, p99, met))
    return targets


def judge_targets(figures: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The GPU speed targets of ``vajra bench adapters``, each met, missed, or not measured."""
    targets = []
    small = figures.get("adapters-llama-3.2-1b", {})
    ratios = {row["adapters"]: row.get("vajra_vs_base") for row in small.get("by_adapters", [])}
    for n in (32, 128):
        value = ratios.get(n) if small.get("model_shape") == "llama-3.2-1b" else None
        text = f"Llama-3.2-1B shape, {n} adapters: Vajra >= {TARGET_MIN_VAJRA_VS_BASE} x base"
        targets.append(_target(text, value, (value or 0.0) >= TARGET_MIN_VAJRA_VS_BASE))
    pinned = [
        f["activation_p50_ms"]["pinned"]
        for f in figures.values()
        if f.get("activation_shape") == "llama-3-8b" and f["activation_p50_ms"].get("pinned")
    ]
    value = pinned[0] if pinned else None  # the first run that measured it
    text = "Llama-3-8B-shaped rank-16 adapter from pinned memory: p50 <= "
    text += f"{TARGET_MAX_PINNED_ACTIVATION_MS} ms"
    targets.append(_target(text, value, (value or 0.0) <= TARGET_MAX_PINNED_ACTIVATION_MS))
    return targets


def run_check(opts: Options) -> tuple[dict[str, Any], list[str]]:
    """Run the plan; return the summary (also written as ``summary.json``) and its text."""
    started, deadline = time.monotonic(), time.monotonic() + opts.budget_s
    opts.out.mkdir(parents=True, exist_ok=True)
    for stale in opts.out.glob("*.json"):
        stale.unlink()
    remove_temporaries(opts.out)  # a step killed while it wrote
    opts.work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(site_dir(opts.work), ignore_errors=True)
    (opts.work / "junit.xml").unlink(missing_ok=True)  # a stale report must not count
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONUNBUFFERED": "1"}
    if opts.dry_run:  # the CPU only, even where a GPU is present
        env["CUDA_VISIBLE_DEVICES"] = ""
    paths = [str(site_dir(opts.work)), str(opts.root), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)

    summary: dict[str, Any] = {"mode": "dry-run" if opts.dry_run else "gpu", "steps": []}
    install = install_step(opts)
    if install is None:
        summary["wheels"] = f"none in {opts.wheels}: the packages already installed are used"
    else:
        summary["steps"].append(run_step(install, opts, env, deadline))
        installed = sorted(p.name.split("-")[0] for p in site_dir(opts.work).glob("*.dist-info"))
        summary["wheels"] = {"folder": str(opts.wheels), "installed": installed}
    blocked = install is not None and summary["steps"][-1]["status"] != "ok"
    for step in plan(opts):
        if blocked:  # without the packages or the device, later steps can only fail
            summary["steps"].append(
                {"name": step.name, "status": "skipped", "reason": "an earlier step failed"}
            )
            continue
        record = run_step(step, opts, env, deadline)
        summary["steps"].append(record)
        written = _load(opts.out / f"{step.name}.json")
        if record["status"] != "ok" and written is not None and is_partial(written):
            record["partial_json"] = True  # its figures so far count; its end is missing
        if step.name == "environment":
            summary["environment"] = environment = _load(opts.out / "environment.json") or {}
            if not opts.dry_run and record["status"] == "ok" and not environment.get("cuda"):
                record |= {
                    "status": "failed",
                    "reason": "torch sees no CUDA device; --dry-run runs on a CPU",
                }
            blocked = record["status"] != "ok"
        if step.name == "tests":
            summary["tests"] = read_junit(opts.work / "junit.xml")
            (opts.out / "tests.json").write_text(json.dumps(summary["tests"], indent=2) + "\n")

    figures = {
        record["name"]: _figures(result)
        for record in summary["steps"]
        if record["name"].startswith("adapters-")
        and (result := _load(opts.out / f"{record['name']}.json"))
    }
    summary["figures"] = figures
    engine = _load(opts.out / "engine-llama-3.2-1b.json") or {}
    summary["engine"] = {
        key: engine.get(key) for key in ("b_context", "f_comparison", "g_adapters")
    }
    train = _load(opts.out / "train-llama-3.2-1b.json") or {}
    summary["train"] = {key: train.get(key) for key in ("device", "training", "latency")}
    summary["decode_kernel"] = decode_kernel_figures(_load(opts.out / "decode-kernel.json") or {})
    summary["targets"] = (
        "not judged: a dry run on the CPU with tiny shapes"
        if opts.dry_run
        else judge_engine_targets(engine) + judge_train_targets(train) + judge_targets(figures)
    )
    summary["seconds"] = round(time.monotonic() - started, 1)
    tests = summary.get("tests", {})
    summary["ok"] = (
        all(s["status"] == "ok" for s in summary["steps"])
        and tests.get("failed", 1) == 0
        and (opts.dry_run or tests.get("skipped", 1) == 0)
    )
    # Kept as a record (docs/bench-results): paths inside the checkout are written relative
    # to it, so the record names the repository's files, not the machine's folders.
    record = _relative_paths(summary, f"{opts.root}{os.sep}")
    (opts.out / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    return summary, summary_lines(summary, opts)


def _relative_paths(value: Any, root: str) -> Any:
    """``value`` with every string that starts with ``root`` shortened to what follows it."""
    if isinstance(value, str):
        return value.removeprefix(root)
    if isinstance(value, list):
        return [_relative_paths(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _relative_paths(v, root) for k, v in value.items()}
    return value


def summary_lines(summary: dict[str, Any], opts: Options) -> list[str]:
    env = summary.get("environment", {})
    lines = [
        f"vajra gpu-check ({summary['mode']}) on {env.get('device', 'an unknown device')}: "
        f"python {env.get('python', '?')}, torch {env.get('torch', '?')}, transformers "
        f"{env.get('transformers', '?')}, peft {env.get('peft', '?')}, safetensors "
        f"{env.get('safetensors', '?')}"
    ]
    if opts.dry_run:
        lines.append(
            "dry run on the CPU: CUDA tests skip themselves and the tiny model shape stands in "
            "for llama-3.2-1b and llama-3-8b; speed targets are not judged"
        )
    if env.get("import_errors"):
        lines.append(f"missing imports (run `make gpu-wheels`): {env['import_errors']}")
    tests = summary.get("tests")
    if tests:
        lines.append(
            f"tests (pytest -m gpu tests/gpu): {tests['passed']} passed, {tests['failed']} "
            f"failed, {tests['skipped']} skipped"
            + (" (no CUDA device)" if opts.dry_run and tests["skipped"] else "")
        )
        lines += [f"  {p['test']}: {p.get('message', p.get('skipped'))}" for p in tests["problems"]]
    for name, fig in summary["figures"].items():
        tiers = ", ".join(f"{t} {ms} ms" for t, ms in fig["activation_p50_ms"].items())
        rows = "; ".join(
            f"{r['adapters']}: {r['vajra_vs_base']} x base"
            + ("" if r["vajra_vs_peft"] is None else f", {r['vajra_vs_peft']} x PEFT")
            for r in fig["by_adapters"]
        )
        lines.append(
            f"{name} ({fig['model_shape']}, {fig['seconds']} s): activation p50 of a "
            f"{fig['activation_shape']} adapter: {tiers}; Vajra by adapters in batch: {rows}"
        )
    for k in summary.get("decode_kernel") or []:
        lines.append(
            f"decode kernel {k['shape']} {k['rows']} rows x {k['context']}: {k['auto_ms']} ms "
            f"({k['vs_bandwidth']} of bandwidth), {k['vs_one_split']}x one split, "
            f"{k['vs_reference']}x torch; best {k['best']}"
        )
    engine = summary.get("engine") or {}
    b = (engine.get("b_context") or {}).get("current") or {}
    if b.get("contexts"):
        steps = ", ".join(
            f"{e['context']}: {e.get('step_p50_ms')} ms ({e.get('vs_floor')}x floor"
            + (f", ops {e['ops_ms_per_step']} ms" if "ops_ms_per_step" in e else "")
            + (f" in {e['ops_per_step']} kernels" if "ops_per_step" in e else "")
            + (f", eager {e['eager_step_p50_ms']} ms" if "eager_step_p50_ms" in e else "")
            + (f", outside the model {e['outside_model_ms']} ms" if "outside_model_ms" in e else "")
            + ")"
            for e in b["contexts"]
        )
        lines.append(f"engine decode step of {b.get('rows')} rows by context: {steps}")
        fused = b.get("fused_layers_error") or b.get("fused_layers", 0)
        lines.append(f"fused decoder-layer modules: {fused}")
        if b.get("decode_graphs_error"):
            lines.append(f"decode graphs failed to capture: {b['decode_graphs_error']}")
        if b.get("decode_kernel_error"):
            lines.append(f"decode kernel failed to build: {b['decode_kernel_error']}")
        if b.get("decode_graphs"):
            graphs = b["decode_graphs"]
            lines.append(
                f"decode graphs: {graphs['captured']} captured in {graphs['capture_s']:.2f} s, "
                f"{graphs['replays']} replays, {graphs['eager']} uncaptured static steps"
            )
    g = engine.get("g_adapters") or {}
    if g.get("results"):
        ratios = ", ".join(
            f"{r['adapters']}: {r.get('adapters_vs_base')}x"
            + (
                f" (weights bound {r['weights_bound_vs_base']}x)"
                if "weights_bound_vs_base" in r
                else ""
            )
            for r in g["results"]
        )
        lines.append(f"engine with distinct adapters, against base-only: {ratios}")
    training = (summary.get("train") or {}).get("training") or {}
    latency = (summary.get("train") or {}).get("latency") or {}
    if training:
        itl = ", ".join(
            f"{name} {(latency.get(name) or {}).get('itl_ms', {}).get('p99', 0):.2f}"
            for name in ("no_job", "preemption_on", "preemption_off")
        )
        lines.append(
            f"training: {training.get('ratio', 0):.3f} x PEFT's tokens/s; inference ITL p99 ms: "
            f"{itl} (bound with preemption on: {latency.get('target_p99_itl_ms', 0):.2f})"
        )
    comparison = engine.get("f_comparison") or {}
    if comparison:
        rates = {k: v.get("output_tok_s") for k, v in comparison.items() if isinstance(v, dict)}
        lines.append(f"engine (tok/s at {comparison.get('concurrency')} in flight): {rates}")
    if isinstance(summary["targets"], list):
        lines += [f"target {t['status']}: {t['target']} ({t['value']})" for t in summary["targets"]]
    for step in summary["steps"]:
        if step["status"] != "ok":
            reason = f" ({step['reason']})" if "reason" in step else ""
            if step.get("partial_json"):
                reason += ": the figures above are those it finished before it ended"
            lines.append(f"step {step['name']}: {step['status']}{reason}")
    lines.append(
        f"JSON: {opts.out}/ ({', '.join(sorted(p.name for p in opts.out.glob('*.json')))})"
    )
    lines.append(f"result: {'OK' if summary['ok'] else 'FAILED'} in {summary['seconds']} s")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vajra.bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help="the same plan on the CPU")
    parser.add_argument("--root", type=Path, default=Path(), help="the repository checkout")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu"))
    parser.add_argument("--work", type=Path, default=Path("build/gpu-check"))
    parser.add_argument("--wheels", type=Path, default=Path(".gpu-wheels"))
    parser.add_argument("--requirements", type=Path, default=Path("requirements-gpu.txt"))
    parser.add_argument("--budget-s", type=float, default=470.0, help="time for the whole plan")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not (root / "tests" / "gpu").is_dir():
        parser.error(f"{root} holds no tests/gpu: run from the repository root or pass --root")
    opts = Options(
        root=root,
        out=(root / args.out).resolve(),
        work=(root / args.work).resolve(),
        wheels=(root / args.wheels).resolve(),
        requirements=(root / args.requirements).resolve(),
        dry_run=args.dry_run,
        budget_s=args.budget_s,
    )
    summary, lines = run_check(opts)
    print("\n".join(lines), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
