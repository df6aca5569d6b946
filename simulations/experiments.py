"""The must-show sweeps: ``python -m simulations.experiments NAME [--out DIR] [--scale-trace F]``.

Each sweep runs shipped configs with one setting varied, and writes ``DIR/NAME.json`` (every
run's report minus its config echo) and ``DIR/NAME.png`` (bars of the compared figures):

* ``prefetch``: reactive LRU loading against each predictor (EWMA, the Serverless-in-the-Wild
  histogram, its idle times as point forecasts (``gap``), the LSTM, fixed 10-minute keep-alive)
  with prediction-aware eviction, and the oracle ceilings; equal tier memory, after a warm-up
  (``WARMUP``), on the Azure 2019 hour, the Azure 2021 sample and the four S-LoRA configs.
* ``placement``: Algorithm 2 (load + locality + affinity) against least-loaded and random.
* ``scale``: the 1, 5 and 20 million request configs; run time against requests.
* ``economics``: the whole Azure 2019 day.
* ``agreement``: the simulated side of the agreement with the real 2-executor cluster.

Errors: as ``simulations.run``; a failed run is reported in the JSON with its error, and the
sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from simulations.config import SimConfigError, load_config
from simulations.plots import write_comparison_plot, write_run_plots, write_scaling_plot
from simulations.run import simulate
from vajra.traces import TraceError

CONFIGS = Path(__file__).resolve().parent / "configs"
TRACES = [
    "prefetch_azure2019",
    "prefetch_azure2021",
    "slora_a01_cv1",
    "slora_a01_cv4",
    "slora_a1_cv1",
    "slora_a1_cv4",
]
PREDICTORS = ["none", "ewma", "histogram", "gap", "lstm", "keepalive", "oracle"]
PLACEMENTS = ["vajra", "least-loaded", "random"]


def _row(label: str, config: str, overrides: dict[str, Any]) -> dict[str, Any]:
    try:
        report = simulate(load_config(CONFIGS / f"{config}.toml", **overrides))
    except (SimConfigError, TraceError) as e:
        return {"label": label, "config": config, "overrides": overrides, "error": str(e)}
    report.pop("_samples")
    report.pop("config")
    loads = report["loads"]
    return {
        "label": label,
        "config": config,
        "overrides": overrides,
        "requests": report["requests"],
        "cold_start_rate": report["cold_start_rate"],
        "ttft_p50_ms": report["ttft_ms"]["p50"],
        "ttft_p99_ms": report["ttft_ms"]["p99"],
        "e2e_p99_ms": report["e2e_ms"]["p99"],
        "bytes_moved": loads["bytes_moved"],
        "errors": report["errors"],
        "report": report,
    }


def _sweep(
    name: str, runs: list[tuple[str, str, dict[str, Any]]], out: Path, *, write: bool = True
) -> list[dict[str, Any]]:
    rows = []
    for label, config, overrides in runs:
        print(f"{name}: {label}", file=sys.stderr, flush=True)
        rows.append(_row(label, config, overrides))
    if write:
        (out / f"{name}.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return rows


VARIANTS: dict[str, dict[str, Any]] = {
    # held warm in GPU memory inside the predicted window: Serverless in the Wild's pre-warm /
    # keep-alive, as a tier policy
    "histogram-warm": {"policy.prefetch": "histogram", "policy.stage_overdue": 0},
    "keepalive-warm": {"policy.prefetch": "keepalive", "policy.stage_overdue": 0},
    # the same predictors with the executors' LRU eviction (the configs say "predicted")
    "histogram-lru": {"policy.prefetch": "histogram", "policy.eviction": "lru"},
    "gap-lru": {"policy.prefetch": "gap", "policy.eviction": "lru"},
    # the ceiling of a predictor that knows only the minute of each next request
    "oracle-minute": {"policy.prefetch": "oracle", "policy.oracle_resolution_ms": 60_000.0},
}
# Warm-up before the measured window (trace.warmup_s): the predictors start with history and
# the tiers warm, for every run of the sweep, reactive included.
WARMUP: dict[str, dict[str, Any]] = {
    "prefetch_azure2019": {  # 06:00-08:00 warm-up, 08:00-09:00 measured
        "trace.start_s": 21_600.0,
        "trace.duration_s": 10_800.0,
        "trace.warmup_s": 7_200.0,
    },
    **{
        t: {"trace.duration_s": 2_400.0, "trace.warmup_s": 600.0}  # 10 min, then 30 measured
        for t in ("slora_a01_cv1", "slora_a01_cv4", "slora_a1_cv1", "slora_a1_cv4")
    },
}


def _earlier_rows(path: Path, replaced: set[str]) -> list[dict[str, Any]]:
    """The rows of an earlier sweep at ``path`` but those labelled in ``replaced`` (none when
    there is no such file)."""
    try:
        rows: list[dict[str, Any]] = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise SimConfigError(f"cannot merge into {path}: {e}") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "label" in r for r in rows):
        raise SimConfigError(f"cannot merge into {path}: not a list of sweep rows")
    return [r for r in rows if r["label"] not in replaced]


def prefetch(
    out: Path,
    traces: Sequence[str],
    predictors: Sequence[str] = (),
    *,
    warmup: bool = True,
    merge: bool = False,
) -> None:
    """One sweep per trace; ``merge``: add the runs to the trace's earlier JSON (a run of the
    same label is replaced), so one predictor can be run alone and compared with the rest."""
    for trace in traces:
        pre = WARMUP.get(trace, {}) if warmup else {}
        labels = list(predictors or PREDICTORS)
        runs = [(p, trace, {**pre, **VARIANTS.get(p, {"policy.prefetch": p})}) for p in labels]
        earlier = _earlier_rows(out / f"prefetch-{trace}.json", set(labels)) if merge else []
        rows = earlier + _sweep(f"prefetch-{trace}", runs, out, write=False)  # written below
        ok = [r for r in rows if "error" not in r]
        base = next((r for r in ok if r["label"] == "none"), None)
        for r in ok:
            if base and base["cold_start_rate"]:
                r["cold_starts_vs_reactive"] = round(
                    1 - r["cold_start_rate"] / base["cold_start_rate"], 4
                )
                r["bytes_vs_reactive"] = round(
                    r["bytes_moved"] / max(1, base["bytes_moved"]) - 1, 4
                )
        (out / f"prefetch-{trace}.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
        write_comparison_plot(
            ok,
            [("cold_start_rate", "cold-start rate"), ("ttft_p99_ms", "TTFT p99 (ms)"),
             ("bytes_moved", "bytes moved")],
            out / f"prefetch-{trace}.png",
            title=f"prefetch vs reactive: {trace}",
        )  # fmt: skip


def placement(out: Path, traces: Sequence[str]) -> None:
    for trace in traces:
        runs = [(p, trace, {"policy.placement": p}) for p in PLACEMENTS]
        rows = _sweep(f"placement-{trace}", runs, out)
        write_comparison_plot(
            [r for r in rows if "error" not in r],
            [("cold_start_rate", "cold-start rate"), ("ttft_p99_ms", "TTFT p99 (ms)")],
            out / f"placement-{trace}.png",
            title=f"placement: {trace}",
        )


def scale(out: Path, sizes: Sequence[str]) -> None:
    rows = _sweep("scale", [(s, f"scale_{s}", {}) for s in sizes], out)
    points = [
        (r["requests"], r["report"]["run_time_s"]["simulate"]) for r in rows if "error" not in r
    ]
    write_scaling_plot(points, out / "scale.png", title="1,000 GPUs, 100,000 adapters, 24 h")


def single(name: str, config: str, out: Path) -> None:
    report = simulate(load_config(CONFIGS / f"{config}.toml"))
    samples = report.pop("_samples")
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    write_run_plots(report, samples, out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulations.experiments")
    ap.add_argument("name", choices=["prefetch", "placement", "scale", "economics", "agreement"])
    ap.add_argument("--out", type=Path, default=Path("docs/simulations"))
    ap.add_argument("--only", action="append", default=[], help="limit to these traces or sizes")
    ap.add_argument(
        "--predictor",
        action="append",
        default=[],
        help=f"prefetch: run only these ({', '.join([*PREDICTORS, *VARIANTS])}); 'none' first",
    )
    ap.add_argument(
        "--no-warmup", action="store_true", help="prefetch: measure from the first request"
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="prefetch: add these runs to the trace's earlier JSON (same label: replaced)",
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.name == "prefetch":
        prefetch(
            args.out,
            args.only or TRACES,
            args.predictor,
            warmup=not args.no_warmup,
            merge=args.merge,
        )
    elif args.name == "placement":
        placement(args.out, args.only or TRACES)
    elif args.name == "scale":
        scale(args.out, args.only or ["1m", "5m", "20m"])
    elif args.name == "economics":
        single("economics_azure2019", "economics_azure2019", args.out)
    else:
        single("agreement_tiny", "agreement_tiny", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
