"""Cost of the same trace on the two baselines, and of the simulated Vajra cluster.

* Dedicated GPU per model: every adapter (tenant model) that receives a request keeps one GPU
  of its own for the whole trace. One GPU per model is a lower bound (a busy model could need
  more), so the ratio reported against it is conservative.
* Fixed keep-alive serverless: each model gets a GPU instance when a request finds none warm
  (a cold start: the whole model loads, ``serverless_cold_start_ms``), serves it alone (batch 1)
  and stays warm ``serverless_keepalive_ms`` after its last request. The GPU is paid while it
  loads, serves or idles warm. One instance per model serving its requests back to back is a
  lower bound too (concurrent requests would need more instances).
* Vajra: the simulated cluster's executors are paid for the whole span, busy or not.

Every price goes through :mod:`vajra.policies.billing` (``MS_PER_HOUR``), the arithmetic the
cluster bills with. Computed from the trace's columns with numpy, O(n log n).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simulations.config import SimConfig
from vajra.policies.billing import MS_PER_HOUR


def gpu_cost_usd(gpu_ms: float, price_per_hour: float) -> float:
    """What holding one GPU for ``gpu_ms`` costs."""
    return gpu_ms * price_per_hour / MS_PER_HOUR


def solo_service_ms(
    cfg: SimConfig, prompt: np.ndarray[Any, Any], output: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """Each request's service time alone on a GPU (batch of one)."""
    c = cfg.costs
    first = c.prefill_ms_base + c.prefill_ms_per_token * prompt.astype(np.float64)
    decode = (c.decode_ms_base + c.decode_ms_per_seq) * np.maximum(output.astype(np.float64) - 1, 0)
    out: np.ndarray[Any, Any] = first + decode
    return out


def dedicated(cfg: SimConfig, source: np.ndarray[Any, Any], span_ms: float) -> dict[str, Any]:
    """One GPU per model that receives traffic, held for ``span_ms``."""
    n = int(source.size)
    models = int(np.unique(source).size) if n else 0
    cost = gpu_cost_usd(models * span_ms, cfg.economics.gpu_price_per_hour)
    return {
        "gpus": models,
        "cost_usd": round(cost, 6),
        "cost_per_request_usd": cost / n if n else None,
        "tenants_per_gpu": 1.0 if models else None,
    }


def keepalive_serverless(
    cfg: SimConfig,
    t_ms: np.ndarray[Any, Any],
    source: np.ndarray[Any, Any],
    prompt: np.ndarray[Any, Any],
    output: np.ndarray[Any, Any],
) -> dict[str, Any]:
    """A warm instance per model, kept ``serverless_keepalive_ms`` after each request."""
    e = cfg.economics
    n = int(t_ms.size)
    if n == 0:
        return {
            "cost_usd": 0.0,
            "cost_per_request_usd": None,
            "cold_starts": 0,
            "cold_start_rate": None,
        }
    order = np.lexsort((t_ms, source))
    ts = t_ms[order]
    src = source[order]
    svc = solo_service_ms(cfg, prompt[order], output[order])
    window = svc + e.serverless_keepalive_ms  # warm from arrival until this long after it
    same = np.empty(n, dtype=bool)
    same[0] = False
    same[1:] = src[1:] == src[:-1]
    gap = np.empty(n)
    gap[0] = np.inf
    gap[1:] = ts[1:] - ts[:-1]
    prev_window = np.empty(n)
    prev_window[0] = np.inf
    prev_window[1:] = window[:-1]
    cold = ~same | (gap > prev_window)
    # the GPU is held from each arrival until the next one of its model or its window's end
    nxt_same = np.append(same[1:], False)
    nxt_gap = np.append(gap[1:], np.inf)
    held_ms = np.where(nxt_same, np.minimum(nxt_gap, window), window)
    cold_count = int(cold.sum())
    total_ms = float(held_ms.sum()) + cold_count * e.serverless_cold_start_ms
    cost = gpu_cost_usd(total_ms, e.gpu_price_per_hour)
    # a dedicated model has its adapter merged (no adapter_compute_factor) but is still
    # reached through a serving path
    ttft = (
        cfg.costs.serving_ms
        + e.serverless_cold_start_ms * cold
        + cfg.costs.prefill_ms_base
        + cfg.costs.prefill_ms_per_token * prompt[order]
    )
    return {
        "keepalive_ms": e.serverless_keepalive_ms,
        "gpu_hours": round(total_ms / MS_PER_HOUR, 6),
        "cost_usd": round(cost, 6),
        "cost_per_request_usd": cost / n,
        "cold_starts": cold_count,
        "cold_start_rate": round(cold_count / n, 6),
        "ttft_ms_p50": round(float(np.percentile(ttft, 50)), 3),
        "ttft_ms_p99": round(float(np.percentile(ttft, 99)), 3),
        "mean_warm_gpus": round(total_ms / max(1.0, float(ts.max() - ts.min())), 3)
        if n > 1
        else None,
    }


def vajra_cluster(cfg: SimConfig, alive_ms: list[float], completed: int) -> dict[str, Any]:
    """The simulated cluster's GPUs, each paid from when it joined (the start, or when the
    provisioner started it) to the end of the span."""
    cost = gpu_cost_usd(sum(alive_ms), cfg.economics.gpu_price_per_hour)
    return {
        "gpus": len(alive_ms),
        "cost_usd": round(cost, 6),
        "cost_per_request_usd": cost / completed if completed else None,
    }
