"""``vajra bench placement``: decision time of Algorithm 2's index as the cluster grows.

For each cluster size (10, 100, 1,000 and 10,000 executors by default) it builds a
:class:`~vajra.policies.placement.PlacementIndex` of one base model, gives every executor a
random load and a random set of resident adapters (``adapters_per_executor`` each, drawn from
``adapters`` keys of ``tenants`` tenants, in random tiers), then times ``decisions`` placement
decisions, each followed by the load update the scheduler makes after dispatching (one
``upsert_executor``) and an affinity note — the per-request work of the live scheduler. The
same decisions are timed against a full scan of every executor (the brute force the index
replaces) on the same state, so the result carries its own reference.

Result: per size, mean and p99 microseconds per decision for the index and for the scan, and
their ratio. Deterministic for a seed; CPU only; one thread.
"""

from __future__ import annotations

import platform
import random
import time
from dataclasses import replace
from typing import Any

from vajra.policies.placement import (
    AdapterKey,
    ExecutorState,
    PlacementIndex,
    PlacementWeights,
    Tier,
    is_eligible,
)

SIZES = (10, 100, 1_000, 10_000)


def _percentile(xs: list[float], pct: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * pct / 100))]


def _scan(idx: PlacementIndex, key: AdapterKey, now: float) -> str | None:
    """Brute force: score every executor (what the index must not do)."""
    holders = idx.holders(key)
    best: tuple[float, str] | None = None
    for eid, s in idx.executors.items():
        tier = holders.get(eid, Tier.REMOTE)
        if not is_eligible(s, tier):
            continue
        total = idx.score(s, tier, idx.affinity(key, eid, now))[0]
        if best is None or (-total, eid) < best:
            best = (-total, eid)
    return None if best is None else best[1]


def bench_size(
    n: int,
    *,
    decisions: int,
    adapters: int,
    tenants: int,
    adapters_per_executor: int,
    scan_decisions: int,
    seed: int,
) -> dict[str, Any]:
    rng = random.Random(seed)
    idx = PlacementIndex(PlacementWeights())
    keys: list[AdapterKey] = [(f"t{i % tenants}", f"d{i}") for i in range(adapters)]
    for i in range(n):
        idx.upsert_executor(
            ExecutorState(
                f"e{i}",
                "m",
                inflight=rng.randrange(0, 16),
                queue_depth=rng.randrange(0, 16),
                max_batch_size=32,
                max_queue=64,
                active_adapters=rng.randrange(0, 50),
                gpu_slots_free=rng.randrange(0, 10),
                gpu_slots=100,
            )
        )
        for key in rng.sample(keys, min(adapters_per_executor, adapters)):
            idx.set_residency(f"e{i}", key, rng.choice([Tier.GPU, Tier.HOST, Tier.DISK]))
    # Zipf-like popularity: a few adapters get most requests.
    weights = [1.0 / (r + 1) for r in range(adapters)]
    requests = rng.choices(keys, weights=weights, k=decisions)
    times: list[float] = []
    now = 0.0
    placed = 0
    for key in requests:
        now += 1.0
        t0 = time.perf_counter()
        p = idx.choose(key, "m", now_ms=now)
        if p is not None:
            s = idx.executors[p.executor_id]
            idx.upsert_executor(replace(s, inflight=(s.inflight + 1) % 16))
            idx.note_placement(key, p.executor_id, now)
            placed += 1
        times.append((time.perf_counter() - t0) * 1e6)
    scan_times: list[float] = []
    for key in requests[:scan_decisions]:
        t0 = time.perf_counter()
        _scan(idx, key, now)
        scan_times.append((time.perf_counter() - t0) * 1e6)
    mean = sum(times) / len(times)
    scan_mean = sum(scan_times) / len(scan_times)
    return {
        "executors": n,
        "decisions": decisions,
        "placed": placed,
        "index_us_mean": round(mean, 2),
        "index_us_p99": round(_percentile(times, 99), 2),
        "scan_us_mean": round(scan_mean, 2),
        "scan_us_p99": round(_percentile(scan_times, 99), 2),
        "scan_over_index": round(scan_mean / mean, 1),
    }


def run_placement_bench(
    *,
    sizes: tuple[int, ...] = SIZES,
    decisions: int = 20_000,
    adapters: int = 100_000,
    tenants: int = 5_000,
    adapters_per_executor: int = 100,
    scan_decisions: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Time decisions at every size; see the module docstring. Raises ValueError for sizes
    or counts below 1."""
    if min((*sizes, decisions, adapters, tenants, scan_decisions)) < 1:
        raise ValueError("sizes, decisions, adapters, tenants and scan_decisions must be >= 1")
    results = [
        bench_size(
            n,
            decisions=decisions,
            adapters=adapters,
            tenants=tenants,
            adapters_per_executor=adapters_per_executor,
            scan_decisions=scan_decisions,
            seed=seed,
        )
        for n in sizes
    ]
    first, last = results[0], results[-1]
    return {
        "bench": "placement",
        "machine": {"python": platform.python_version(), "cpu": platform.processor()},
        "params": {
            "decisions": decisions,
            "adapters": adapters,
            "tenants": tenants,
            "adapters_per_executor": adapters_per_executor,
            "seed": seed,
        },
        "sizes": results,
        # How much a decision slowed from the smallest to the largest cluster, against how
        # much the cluster grew: sublinear when far below 1.
        "growth": {
            "executors_ratio": last["executors"] / first["executors"],
            "index_time_ratio": round(last["index_us_mean"] / first["index_us_mean"], 2),
        },
    }
