"""``python -m simulations.run --config simulations/configs/NAME.toml [--json PATH] [--plots DIR]``.

Builds the trace, the cluster and the policies a config names, simulates with a progress bar
(rich, updated once per 65,536 arrivals), and reports cold-start rate, TTFT and end-to-end
percentiles, GPU utilisation, tenants per GPU and cost per request against the dedicated-GPU
and fixed keep-alive serverless baselines, as JSON (stdout, and ``--json``) and PNG plots.

Errors: a bad config or trace prints one line naming the problem and exits with status 2.
Ctrl-C stops the run and exits 130 without writing results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from simulations import baselines
from simulations.calibration import calibrated
from simulations.cluster import build_executors
from simulations.config import SimConfig, SimConfigError, load_config
from simulations.engine import Simulator
from simulations.placement import LeastLoaded, PolicyPlacement, RandomPlacement, SimPlacement
from simulations.prefetch import build_prefetch
from simulations.workload import build_trace
from vajra.traces import TraceError


def tenant_of(cfg: SimConfig) -> Callable[[int], int]:
    """Each adapter's tenant: itself (``trace.tenants`` 0), else adapter % ``trace.tenants``."""
    n = cfg.trace.tenants
    if n <= 0:
        return int
    return lambda adapter: adapter % n


def build_placement(cfg: SimConfig, sim_executors: list[Any]) -> SimPlacement:
    p = cfg.policy
    if p.placement == "least-loaded":
        return LeastLoaded(sim_executors)
    if p.placement == "random":
        return RandomPlacement(sim_executors, cfg.run.seed)
    return PolicyPlacement(
        sim_executors,
        base_model=cfg.cluster.base_model,
        alpha=p.alpha,
        beta=p.beta,
        gamma=p.gamma,
        load_step=p.load_step,
        tenant_of=tenant_of(cfg),
    )


def simulate(cfg: SimConfig, *, show_progress: bool = False) -> dict[str, Any]:
    """Run one config to the end; the report as JSON-able data."""
    cfg = calibrated(cfg)
    t0 = time.perf_counter()
    trace = build_trace(cfg)
    t_trace = time.perf_counter() - t0
    executors = build_executors(cfg.cluster)
    placement = build_placement(cfg, executors)
    sim = Simulator(
        cfg, trace, executors, placement, tenant_of=tenant_of(cfg), prefetch=build_prefetch(cfg)
    )
    t1, c1 = time.perf_counter(), time.process_time()
    if show_progress and len(trace):
        with Progress(
            TextColumn(f"[bold]{cfg.run.name}"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,} requests"),
            TimeElapsedColumn(),
            transient=True,
        ) as bar:
            task = bar.add_task("simulate", total=len(trace))
            sim.run(lambda done: bar.update(task, completed=done))
    else:
        sim.run()
    t_sim, c_sim = time.perf_counter() - t1, time.process_time() - c1
    report = sim.summary()
    completed = report["completed"]
    span = sim.span_ms
    t_ms, src = trace.t_ms, trace.source
    report["economics"] = {
        "vajra": baselines.vajra_cluster(cfg, sim.alive_ms, completed),
        "dedicated": baselines.dedicated(cfg, src, span),
        "keepalive_serverless": baselines.keepalive_serverless(
            cfg, t_ms, src, trace.prompt_tokens, trace.output_tokens
        ),
        "billed_per_request_usd": report["billed_usd"] / completed if completed else None,
    }
    eco = report["economics"]
    vajra_cpr = eco["vajra"]["cost_per_request_usd"]
    for name in ("dedicated", "keepalive_serverless"):
        base = eco[name]["cost_per_request_usd"]
        eco[f"{name}_over_vajra"] = round(base / vajra_cpr, 3) if base and vajra_cpr else None
    report["config"] = {
        "name": cfg.run.name,
        "trace": cfg.trace.__dict__,
        "cluster": cfg.cluster.__dict__,
        "costs": cfg.costs.__dict__,
        "policy": cfg.policy.__dict__,
        "economics": cfg.economics.__dict__,
        "seed": cfg.run.seed,
    }
    report["trace"] = {
        "name": trace.name,
        "requests": len(trace),
        "adapters_used": eco["dedicated"]["gpus"],
    }
    report["run_time_s"] = {
        "trace": round(t_trace, 3),
        "simulate": round(t_sim, 3),
        "simulate_cpu": round(c_sim, 3),
        "us_per_request": round(t_sim / max(1, len(trace)) * 1e6, 3),
        "cpu_us_per_request": round(c_sim / max(1, len(trace)) * 1e6, 3),
    }
    report["_samples"] = {
        "t_ms": sim.metrics.samples_t_ms,
        "resident": sim.metrics.samples_resident,
        "active": sim.metrics.samples_active,
        "utilisation": [
            min(1.0, ex.busy_ms / max(alive, 1e-9))
            for ex, alive in zip(sim.executors, sim.alive_ms, strict=True)
        ],
        "ttft_ms": sim.metrics.ttft_ms[sim.metrics.outcome == 0],
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m simulations.run", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--config", required=True, help="a TOML file under simulations/configs/")
    ap.add_argument("--json", type=Path, help="also write the report here")
    ap.add_argument("--plots", type=Path, help="write PNG plots into this directory")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (TOML syntax), e.g. --set policy.prefetch='\"ewma\"'",
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        overrides = _parse_overrides(args.set)
        cfg = load_config(args.config, **overrides)
        report = simulate(cfg, show_progress=not args.quiet and sys.stderr.isatty())
    except (SimConfigError, TraceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    samples = report.pop("_samples")
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.plots:
        from simulations.plots import write_run_plots

        write_run_plots(report, samples, args.plots)
    print(text)
    return 0


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SimConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value  # a bare word is a string
    return out


if __name__ == "__main__":
    raise SystemExit(main())
