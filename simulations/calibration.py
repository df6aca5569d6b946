"""Execution and load times measured by ``vajra bench``, turned into a config's numbers.

* ``costs.bench_engine_json`` (``vajra bench engine`` JSON, section ``a_concurrency``): the
  decode iteration time is fitted by least squares as ``decode_ms_base + decode_ms_per_seq x
  b`` over the levels' (mean requests in flight, median step time), leaving out the largest
  levels while the intercept comes out negative (step time superlinear there); the prefill cost comes from
  the single-request level: one step is ``prefill_ms_base``, and the rest of its median time to
  first token over its mean prompt length is ``prefill_ms_per_token``.
* ``cluster.bench_adapters_json`` (``vajra bench adapters`` JSON, ``activation.tiers``): the
  median activation time of an adapter of ``safetensors_bytes`` from pinned host memory and
  from the page cache (disk) become the host and disk bandwidths, latency zero, so an adapter of
  that size loads in exactly the measured time.

Errors: a missing file or a JSON without those sections raises
:class:`simulations.config.SimConfigError` naming the file and the missing key.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from simulations.config import SimConfig, SimConfigError


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SimConfigError(f"cannot read bench JSON {path}: {e}") from e
    if not isinstance(data, dict):
        raise SimConfigError(f"{path}: expected a JSON object")
    return data


def engine_costs(path: Path) -> dict[str, Any]:
    """The four [costs] numbers fitted from a ``vajra bench engine`` JSON."""
    data = _read(path)
    try:
        levels = [lv for lv in data["a_concurrency"]["levels"] if lv.get("steps")]
        b = np.array([float(lv["mean_in_flight"]) for lv in levels])
        step = np.array([float(lv["step_p50_ms"]) for lv in levels])
        solo = min(levels, key=lambda lv: float(lv["concurrency"]))
        prompt = float(solo["prompt_tokens"]) / max(1, int(solo["requests"]))
        solo_step, solo_ttft = float(solo["step_p50_ms"]), float(solo["ttft_p50_ms"])
    except (KeyError, TypeError, ValueError) as e:
        raise SimConfigError(f"{path}: not a vajra bench engine JSON (missing {e})") from e
    slope, intercept = 0.0, float(step.mean())
    keep = len(levels)
    while keep >= 2 and np.ptp(b[:keep]) > 0:
        # levels are in rising concurrency; a step time that grows faster than linearly at the
        # largest batch (memory-bound attention) would pull the intercept below zero: drop it
        order = np.argsort(b)[:keep]
        slope, intercept = (float(x) for x in np.polyfit(b[order], step[order], 1))
        if intercept >= 0 or keep == 2:
            break
        keep -= 1
    return {
        "decode_ms_base": round(max(0.0, float(intercept)), 4),
        "decode_ms_per_seq": round(max(0.0, float(slope)), 5),
        "prefill_ms_base": round(solo_step, 4),
        "prefill_ms_per_token": round(max(0.0, solo_ttft - solo_step) / max(1.0, prompt), 6),
    }


def adapter_tiers(path: Path) -> dict[str, Any]:
    """Host and disk load bandwidths (GB/s, latency 0) from a ``vajra bench adapters`` JSON."""
    data = _read(path)
    try:
        act = data["activation"]
        nbytes = float(act["safetensors_bytes"])
        host_ms = float(act["tiers"]["pinned"]["p50_ms"])
        disk_ms = float(act["tiers"]["page_cache"]["p50_ms"])
    except (KeyError, TypeError, ValueError) as e:
        raise SimConfigError(f"{path}: not a vajra bench adapters JSON (missing {e})") from e
    if host_ms <= 0 or disk_ms <= 0:
        raise SimConfigError(f"{path}: load times must be positive")
    return {
        "host_gbps": nbytes / (host_ms * 1e6),
        "host_latency_ms": 0.0,
        "disk_gbps": nbytes / (disk_ms * 1e6),
        "disk_latency_ms": 0.0,
    }


def calibrated(cfg: SimConfig) -> SimConfig:
    """``cfg`` with costs and tier bandwidths replaced by the bench JSON files it names."""
    if cfg.costs.bench_engine_json:
        costs = engine_costs(cfg.resolve(cfg.costs.bench_engine_json))
        cfg = dataclasses.replace(cfg, costs=dataclasses.replace(cfg.costs, **costs))
    if cfg.cluster.bench_adapters_json:
        tiers = adapter_tiers(cfg.resolve(cfg.cluster.bench_adapters_json))
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **tiers))
    return cfg
