"""PNG plots of a run and of a comparison of runs (matplotlib, the Agg backend, no display).

Errors: an unwritable directory raises ``OSError``; nothing else is raised for empty data (a
plot with no points says so in its title).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_run_plots(report: dict[str, Any], samples: dict[str, Any], out: Path) -> list[Path]:
    """Four plots of one run into ``out``: TTFT CDF, utilisation, tenants over time, cost."""
    out.mkdir(parents=True, exist_ok=True)
    name = report["config"]["name"]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ttft = np.sort(np.asarray(samples["ttft_ms"], dtype=np.float64))
    if ttft.size:
        ax.plot(np.maximum(ttft, 1e-3), np.arange(1, ttft.size + 1) / ttft.size)
        ax.set_xscale("log")
    ax.set(
        xlabel="time to first token (ms)",
        ylabel="fraction of requests",
        title=f"{name}: TTFT CDF" + ("" if ttft.size else " (no completed requests)"),
    )
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / f"{name}-ttft-cdf.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    util = np.asarray(samples["utilisation"], dtype=np.float64)
    ax.hist(util, bins=min(40, max(1, util.size)), range=(0, 1))
    ax.set(
        xlabel="GPU utilisation (busy share of the run)",
        ylabel="executors",
        title=f"{name}: utilisation, mean {util.mean() if util.size else 0:.2f}",
    )
    paths.append(_save(fig, out / f"{name}-utilisation.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    t = np.asarray(samples["t_ms"], dtype=np.float64) / 60_000.0
    if t.size:
        ax.plot(t - t[0], samples["resident"], label="GPU-resident adapters")
        ax.plot(t - t[0], samples["active"], label="adapters with a request in flight")
        ax.legend()
    ax.set(
        xlabel="minutes", ylabel="per GPU (mean over executors)", title=f"{name}: tenants per GPU"
    )
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out / f"{name}-tenants.png"))

    eco = report["economics"]
    labels = ["Vajra", "dedicated GPU\nper model", "keep-alive\nserverless"]
    values = [
        eco["vajra"]["cost_per_request_usd"],
        eco["dedicated"]["cost_per_request_usd"],
        eco["keepalive_serverless"]["cost_per_request_usd"],
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, [v or 0.0 for v in values], color=["tab:green", "tab:red", "tab:orange"])
    ax.set_yscale("log")
    ax.set(ylabel="cost per request (USD, log)", title=f"{name}: cost per request")
    for i, v in enumerate(values):
        if v:
            ax.annotate(f"${v:.2e}", (i, v), ha="center", va="bottom")
    paths.append(_save(fig, out / f"{name}-cost.png"))
    return paths


def write_comparison_plot(
    rows: Sequence[dict[str, Any]],
    metrics: Sequence[tuple[str, str]],
    path: Path,
    *,
    title: str,
    log: Sequence[bool] | None = None,
) -> Path:
    """Bars of ``metrics`` (key into each row, axis label) for each row's ``label``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4.2), squeeze=False)
    labels = [str(r["label"]) for r in rows]
    for k, (key, axis) in enumerate(metrics):
        ax = axes[0][k]
        vals = [float(r.get(key) or 0.0) for r in rows]
        ax.bar(range(len(rows)), vals)
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(axis)
        if log is not None and log[k] and any(v > 0 for v in vals):
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def write_scaling_plot(points: Sequence[tuple[int, float]], path: Path, *, title: str) -> Path:
    """Run time (s) against requests simulated, with the line through the origin and the first point."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    ax.plot(xs / 1e6, ys, "o-", label="measured")
    if xs.size:
        ax.plot(xs / 1e6, ys[0] / xs[0] * xs, "--", label="linear from the first point")
    ax.set(xlabel="requests (millions)", ylabel="simulation run time (s)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)
