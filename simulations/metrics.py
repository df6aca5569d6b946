"""One metrics store for a simulation run: per-request arrays in, every reported figure out.

Per request (preallocated numpy arrays, a few bytes each so 20 million fit): time to first
token, end-to-end latency, whether it was a cold start (its adapter not ready in GPU memory at
arrival on its executor), and its outcome (done, or an error code). Per executor: busy time,
loads, bytes loaded, distinct adapters served. Periodic samples: GPU-resident adapters and
requests in flight per executor.

:meth:`MetricsStore.summary` turns these into the JSON the run writes; percentiles are over
completed requests only, and errors are counted by type.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from simulations.cluster import Executor

OK, NO_CAPACITY, PENDING = 0, 1, 255
ERROR_NAMES = {NO_CAPACITY: "no_capacity"}


def _pct(values: np.ndarray[Any, Any], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values.size else None


class MetricsStore:
    """Everything a run measures; the engine writes, :meth:`summary` reads."""

    def __init__(self, requests: int) -> None:
        self.ttft_ms = np.zeros(requests, dtype=np.float32)
        self.e2e_ms = np.zeros(requests, dtype=np.float32)
        self.cold = np.zeros(requests, dtype=np.bool_)
        self.outcome = np.full(requests, PENDING, dtype=np.uint8)
        self.gpu_ms_total = 0.0
        self.billed_usd = 0.0
        self.prefetch_loads = 0
        self.prefetch_bytes = 0
        self.prefetch_loads_used = 0  # prefetched into GPU memory and used before eviction
        self.samples_resident: list[float] = []  # mean GPU-resident adapters per executor
        self.samples_active: list[float] = []  # mean adapters with a request in flight per executor
        self.samples_t_ms: list[float] = []
        self.end_ms = 0.0
        self.first = 0  # requests before this index are warm-up: in no figure

    def start_measuring(self, first: int, executors: list[Executor]) -> None:
        """The warm-up ends: requests from index ``first`` on are measured, and every counter
        so far (busy time, loads, bytes, samples, GPU ms) restarts from zero."""
        self.first = first
        self.gpu_ms_total = 0.0
        self.prefetch_loads = self.prefetch_bytes = self.prefetch_loads_used = 0
        self.samples_resident.clear()
        self.samples_active.clear()
        self.samples_t_ms.clear()
        for ex in executors:
            ex.loads = ex.bytes_loaded = ex.gpu_overflow = 0
            ex.busy_ms = 0.0
            ex.served.clear()

    def finish(self, i: int, ttft_ms: float, e2e_ms: float, cold: bool) -> None:
        self.ttft_ms[i] = ttft_ms
        self.e2e_ms[i] = e2e_ms
        self.cold[i] = cold
        self.outcome[i] = OK

    def fail(self, i: int, code: int) -> None:
        self.outcome[i] = code

    def sample(self, now_ms: float, executors: list[Executor]) -> None:
        n = max(1, len(executors))
        self.samples_t_ms.append(now_ms)
        self.samples_resident.append(sum(len(ex.gpu) for ex in executors) / n)
        self.samples_active.append(sum(len(ex.in_use) for ex in executors) / n)

    def summary(
        self, executors: list[Executor], *, span_ms: float, alive_ms: list[float] | None = None
    ) -> dict[str, Any]:
        """The run's figures as plain JSON-able data. ``span_ms``: first arrival to last event;
        ``alive_ms``: each executor's part of it (a provisioned GPU joins late; default: all)."""
        first = self.first  # warm-up requests are left out
        outcome = self.outcome[first:]
        done = outcome == OK
        completed = int(done.sum())
        ttft = self.ttft_ms[first:][done]
        e2e = self.e2e_ms[first:][done]
        cold = int(self.cold[first:][done].sum())
        errors = {
            name: int((outcome == code).sum())
            for code, name in ERROR_NAMES.items()
            if (outcome == code).any()
        }
        pending = int((outcome == PENDING).sum())
        span = max(span_ms, 1e-9)
        alive = alive_ms if alive_ms is not None else [span] * len(executors)
        util = [min(1.0, ex.busy_ms / max(a, 1e-9)) for ex, a in zip(executors, alive, strict=True)]
        served = [len(ex.served) for ex in executors]
        loads = sum(ex.loads for ex in executors)
        bytes_loaded = sum(ex.bytes_loaded for ex in executors)
        return {
            "requests": int(outcome.size),
            "warmup_requests": first,
            "completed": completed,
            "errors": errors,
            "unfinished": pending,
            "cold_starts": cold,
            "cold_start_rate": round(cold / completed, 6) if completed else None,
            "ttft_ms": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99), "mean": _mean(ttft)},
            "e2e_ms": {"p50": _pct(e2e, 50), "p99": _pct(e2e, 99), "mean": _mean(e2e)},
            "gpu_utilisation": {
                "mean": round(float(np.mean(util)), 6) if util else None,
                "min": round(min(util), 6) if util else None,
                "max": round(max(util), 6) if util else None,
                "definition": "share of the run an executor had a request in prefill or decode "
                "(waiting for an adapter load is not busy)",
            },
            "tenants_per_gpu": {
                "served_mean": round(float(np.mean(served)), 3) if served else None,
                "resident_mean": _mean_list(self.samples_resident),
                "active_mean": _mean_list(self.samples_active),
                "active_max": round(max(self.samples_active), 3) if self.samples_active else None,
                "definition": "served: distinct adapters an executor served over the run; "
                "resident: adapters in GPU memory, sampled; active: adapters with a request "
                "in flight, sampled (mean and peak)",
            },
            "loads": {
                "gpu_loads": loads,
                "bytes_moved": bytes_loaded,
                "prefetch_loads": self.prefetch_loads,
                "prefetch_bytes": self.prefetch_bytes,
                "prefetch_loads_used": self.prefetch_loads_used,
                "gpu_slot_overflows": sum(ex.gpu_overflow for ex in executors),
            },
            "gpu_ms_total": round(self.gpu_ms_total, 3),
            "billed_usd": self.billed_usd,
            "span_ms": round(span_ms, 3),
        }


def _mean(values: np.ndarray[Any, Any]) -> float | None:
    return round(float(values.mean(dtype=np.float64)), 3) if values.size else None


def _mean_list(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


GAP_EDGES_MS = (10_000.0, 60_000.0, 600_000.0)
GAP_NAMES = ("gap_under_10s", "gap_10s_1min", "gap_1_10min", "gap_over_10min")


def cold_breakdown(
    t_ms: np.ndarray[Any, Any], source: np.ndarray[Any, Any], store: MetricsStore
) -> dict[str, Any]:
    """The measured, completed cold starts by the gap since the same adapter's previous request
    (warm-up included): ``first_touch`` has none in the whole trace (no predictor can know of
    it), the rest by gap. Also how many measured requests fall in each class. O(n log n) time
    and 24 bytes a request of scratch memory: asked for by ``run.cold_breakdown``."""
    n = len(source)
    gap = np.full(n, np.inf)
    if n > 1:
        order = np.argsort(source, kind="stable")  # grouped by adapter, in arrival order
        src, ts = source[order], t_ms[order]
        gap[order[1:]] = np.where(src[1:] == src[:-1], ts[1:] - ts[:-1], np.inf)
    first = store.first
    done = store.outcome[first:] == OK
    g = gap[first:][done]
    cold = store.cold[first:][done]
    classes = {"first_touch": np.isinf(g)}
    lo = 0.0
    for name, hi in zip(GAP_NAMES, (*GAP_EDGES_MS, np.inf), strict=True):
        classes[name] = (g >= lo) & (g < hi) & ~np.isinf(g)
        lo = hi
    return {
        "cold": {k: int((m & cold).sum()) for k, m in classes.items()},
        "requests": {k: int(m.sum()) for k, m in classes.items()},
    }
