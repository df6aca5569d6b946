"""Execution and load times measured by ``vajra bench``, turned into a config's numbers.

* ``costs.bench_engine_json`` (``vajra bench engine`` JSON, section ``a_concurrency``): the
  decode iteration time is fitted by least squares as ``decode_ms_base + decode_ms_per_seq x
  b`` over the levels' (mean requests in flight, median step time), leaving out the largest
  levels while the intercept comes out negative (step time superlinear there); the prefill cost comes from
  the single-request level: one step is ``prefill_ms_base``, and the rest of its median time to
  first token over its mean prompt length is ``prefill_ms_per_token``.
  When that JSON has ``g_adapters`` (multi-adapter against base-model throughput), its
  lowest-concurrency result sets ``adapter_compute_factor`` = 1 / ``adapters_vs_base``: a
  request with an adapter takes that much longer per step; a JSON without it leaves the factor.
* ``costs.bench_serving_json`` (``vajra bench serving`` JSON): ``serving_ms`` is the SDK's
  median first-token time through the whole cluster (``sdk_stream_adapters``, else
  ``sdk_stream``) less the engine's own time per step of the same requests run alone
  (``engine_adapters``, else ``engine``: ``seconds / steps``; every request is admitted in one
  step, so the engine emits their first tokens after one step). The mean step is shorter than
  the first step, which holds every prefill, so this is a slight overestimate of the path.
  A ``vajra bench paced`` JSON (one request at a time, idle gaps between them) gives
  ``serving_ms`` as its own ``serving_ms`` (median first token less the engine's first step of
  the same request), and ``host.serving_cpu_ms`` (``paced.serving_cpu_ms_per_request``: CPU per
  request of every process but the executor) and ``host.background_cores`` (the sum of
  ``paced.idle_cpu_ms_per_s`` but ``executor_loop``, a part of ``executor``, over 1000).
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


def adapter_compute_factor(path: Path) -> float | None:
    """1 / ``adapters_vs_base`` of the lowest-concurrency ``g_adapters`` result of a ``vajra
    bench engine`` JSON; None when the JSON has no ``g_adapters`` section."""
    data = _read(path)
    if "g_adapters" not in data:
        return None
    try:
        results = data["g_adapters"]["results"]
        solo = min(results, key=lambda r: float(r["concurrency"]))
        ratio = float(solo["adapters_vs_base"])
    except (KeyError, TypeError, ValueError) as e:
        raise SimConfigError(f"{path}: g_adapters without a usable result (missing {e})") from e
    if not 0 < ratio < float("inf"):
        raise SimConfigError(f"{path}: g_adapters adapters_vs_base must be positive: {ratio}")
    return round(1.0 / ratio, 4)


def paced_host(path: Path) -> dict[str, float] | None:
    """``serving_cpu_ms`` and ``background_cores`` from a ``vajra bench paced`` JSON (None for
    a ``vajra bench serving`` one, which measures neither)."""
    data = _read(path)
    if data.get("benchmark") != "paced":
        return None
    try:
        paced = data["paced"]
        cpu = float(paced["serving_cpu_ms_per_request"])
        idle_ms = paced["idle_cpu_ms_per_s"]  # executor_loop is a part of executor
        idle = sum(float(ms) for k, ms in idle_ms.items() if k != "executor_loop") / 1000.0
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SimConfigError(f"{path}: not a vajra bench paced JSON (missing {e})") from e
    if not (0 <= cpu < float("inf") and 0 <= idle < float("inf")):
        raise SimConfigError(f"{path}: CPU figures must be finite and >= 0")
    return {"serving_cpu_ms": round(cpu, 3), "background_cores": round(idle, 4)}


def serving_ms(path: Path) -> float:
    """The serving path's latency before the first token, from a ``vajra bench serving`` or
    ``vajra bench paced`` JSON."""
    data = _read(path)
    if data.get("benchmark") == "paced":
        try:
            path_ms = float(data["serving_ms"])
        except (KeyError, TypeError, ValueError) as e:
            raise SimConfigError(f"{path}: not a vajra bench paced JSON (missing {e})") from e
        if not 0 <= path_ms < float("inf"):
            raise SimConfigError(f"{path}: serving_ms {path_ms} must be >= 0")
        return round(path_ms, 3)
    sdk, engine = "sdk_stream_adapters", "engine_adapters"
    if sdk not in data or engine not in data:
        sdk, engine = "sdk_stream", "engine"
    try:
        first_ms = float(data[sdk]["first_token_p50_ms"])
        step_ms = float(data[engine]["seconds"]) * 1000.0 / int(data[engine]["steps"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise SimConfigError(f"{path}: not a vajra bench serving JSON (missing {e})") from e
    path_ms = first_ms - step_ms
    if not 0 <= path_ms < float("inf"):
        raise SimConfigError(
            f"{path}: first token {first_ms} ms is not after one engine step {step_ms:.3f} ms"
        )
    return round(path_ms, 3)


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
    """``cfg`` with costs, serving path and tier bandwidths replaced by the bench JSON files it
    names."""
    if cfg.costs.bench_engine_json:
        path = cfg.resolve(cfg.costs.bench_engine_json)
        costs = engine_costs(path)
        factor = adapter_compute_factor(path)
        if factor is not None:
            costs["adapter_compute_factor"] = factor
        cfg = dataclasses.replace(cfg, costs=dataclasses.replace(cfg.costs, **costs))
    if cfg.costs.bench_serving_json:
        path = cfg.resolve(cfg.costs.bench_serving_json)
        cfg = dataclasses.replace(
            cfg, costs=dataclasses.replace(cfg.costs, serving_ms=serving_ms(path))
        )
        host = paced_host(path)
        if host is not None:
            cfg = dataclasses.replace(
                cfg,
                host=dataclasses.replace(
                    cfg.host,
                    serving_cpu_ms=host["serving_cpu_ms"],
                    background_cores=host["background_cores"],
                ),
            )
    if cfg.cluster.bench_adapters_json:
        tiers = adapter_tiers(cfg.resolve(cfg.cluster.bench_adapters_json))
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **tiers))
    return cfg
