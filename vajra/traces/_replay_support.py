"""What a replay needs besides sending requests: adapters, counters, usage, a progress bar.

- :func:`register_adapters`: random PEFT adapters for the cluster's base model, pushed under
  the client's tenant; a name that already has an active version is reused as it is.
- :func:`read_counters`: the executors' ``adapter_requests_cold`` / ``_warm`` counters and
  adapter load histograms, scraped from their Prometheus endpoints
  (``vajra_actor_events_total``, ``vajra_adapter_load_seconds``); :func:`adapter_loads`: loads
  and mean load time per tier between two readings.
- :func:`usage_totals` / :func:`wait_for_usage`: the tenant's usage totals, and a bounded
  wait for the ledger to have recorded a replay's requests.

Errors: scraping failures raise :class:`TraceError` naming the endpoint; SDK calls raise
the SDK's typed errors. Every wait is bounded.
"""

from __future__ import annotations

import functools
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import trio
from prometheus_client.parser import text_string_to_metric_families
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from vajra.client import AsyncClient
from vajra.traces._trace import TraceError

if TYPE_CHECKING:
    from vajra.adapters.format import BaseModelSpec

COLD_EVENTS = ("adapter_requests_cold", "adapter_requests_warm")
#: The executors' adapter load histogram and its tiers: ``store`` (fetch from the object
#: store), ``disk`` (read from the local cache), ``host`` (validate and pack into host memory),
#: ``gpu`` (wait for the model and copy into a slot); see vajra.actors.adapter_tiers.
LOAD_HISTOGRAM = "vajra_adapter_load_seconds"
LOAD_TIERS = ("store", "disk", "host", "gpu")
_SCRAPE_TIMEOUT_S = 10.0


def summary(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99, max and mean of ``values`` in the same unit, rounded to 0.01 (None
    each when there are none)."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = (round(float(x), 2) for x in np.percentile(arr, [50, 90, 99]))
    return {
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": round(float(arr.max()), 2),
        "mean": round(float(arr.mean()), 2),
        "n": int(arr.shape[0]),
    }


def _scrape(url: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT_S) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (OSError, urllib.error.URLError) as exc:
        raise TraceError(
            f"cannot read executor metrics at {url}: {exc}", column="metrics"
        ) from None
    found: dict[str, float] = dict.fromkeys(COLD_EVENTS, 0.0)
    for family in text_string_to_metric_families(text):
        if family.name == "vajra_actor_events":
            for sample in family.samples:
                event = sample.labels.get("event")
                if sample.name.endswith("_total") and event in found:
                    found[event] += sample.value
        elif family.name == LOAD_HISTOGRAM:
            for sample in family.samples:
                tier = sample.labels.get("tier")
                if tier in LOAD_TIERS and sample.name.endswith(("_sum", "_count")):
                    key = f"load_{tier}_{sample.name.rsplit('_', 1)[1]}"
                    found[key] = found.get(key, 0.0) + sample.value
    return found


async def read_counters(urls: Sequence[str]) -> dict[str, float] | None:
    """The executors' cold/warm adapter request counters and their adapter load histograms'
    sums (seconds) and counts per tier (``load_TIER_sum`` / ``load_TIER_count``), summed over
    ``urls`` (None when there are no endpoints). Raises :class:`TraceError` when an endpoint
    cannot be read."""
    if not urls:
        return None
    total: dict[str, float] = dict.fromkeys(COLD_EVENTS, 0.0)
    for url in urls:
        one = await trio.to_thread.run_sync(_scrape, url)
        for k, v in one.items():
            total[k] = total.get(k, 0.0) + v
    return total


def adapter_loads(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Loads per tier between two :func:`read_counters` readings, and their mean time (ms),
    as the executors measured them (``vajra_adapter_load_seconds``)."""
    out: dict[str, Any] = {}
    for tier in LOAD_TIERS:
        n = after.get(f"load_{tier}_count", 0.0) - before.get(f"load_{tier}_count", 0.0)
        s = after.get(f"load_{tier}_sum", 0.0) - before.get(f"load_{tier}_sum", 0.0)
        out[tier] = {"loads": int(n), "mean_ms": round(1000.0 * s / n, 3) if n > 0 else None}
    return out


async def usage_totals(client: AsyncClient) -> dict[str, float]:
    """The tenant's running totals: requests, gpu_ms and (where the ledger reports it)
    billed_ms."""
    u: Any = await client.usage()
    out = {"requests": float(u.requests), "gpu_ms": float(u.gpu_ms)}
    billed = getattr(u, "billed_ms", None)
    if billed is not None:
        out["billed_ms"] = float(billed)
    return out


async def wait_for_usage(
    client: AsyncClient, before: dict[str, float], expected: int, limit_s: float
) -> dict[str, float]:
    """Poll the totals until ``expected`` more requests are recorded, they stop growing for a
    second, or ``limit_s`` passes; returns the last totals read."""
    last = await usage_totals(client)
    still = 0
    with trio.move_on_after(limit_s):
        while last["requests"] - before["requests"] < expected:
            await trio.sleep(0.25)
            now = await usage_totals(client)
            still = still + 1 if now["requests"] == last["requests"] else 0
            last = now
            if still >= 4:
                break
    return last


def adapter_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index}"


async def register_adapters(
    client: AsyncClient,
    spec: BaseModelSpec,
    count: int,
    *,
    prefix: str = "replay",
    rank: int = 8,
    seed: int = 0,
    on_pushed: Callable[[], None] | None = None,
) -> tuple[list[str], int]:
    """Make sure ``prefix-0 .. prefix-(count-1)`` exist for the client's tenant; returns the
    names and how many were pushed now. Adapters are rank-``rank`` random LoRA on q and v
    (seed ``seed + i``), built for ``spec``. Raises the SDK's error if an upload is refused.
    """
    from vajra.bench.lora_models import random_adapter  # torch: only when adapters are made

    existing = {a.name for a in await client.list_adapters() if a.active}
    names = [adapter_name(prefix, i) for i in range(count)]
    missing = [i for i, n in enumerate(names) if n not in existing]
    for i in missing:
        made = await trio.to_thread.run_sync(
            functools.partial(
                random_adapter,
                spec,
                rank=rank,
                alpha=2.0 * rank,
                targets=("q_proj", "v_proj"),
                seed=seed + i,
            )
        )
        await client.push_adapter_bytes(made.config_json, made.weights, names[i])
        if on_pushed is not None:
            on_pushed()
    return names, len(missing)


class ProgressBar:
    """A rich progress bar over ``total`` requests (a no-op when not ``enabled``)."""

    def __init__(self, total: int, *, enabled: bool, label: str) -> None:
        self._progress: Progress | None = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=False,
            )
            self._task = self._progress.add_task(label[:40], total=total)

    def __enter__(self) -> ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)
