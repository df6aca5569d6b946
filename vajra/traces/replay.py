"""Trace replay: drive a running cluster open-loop at a trace's timestamps and measure it.

Data flows left to right::

    Trace (adapter-indexed) ─▶ dispatcher (sleeps until each arrival's time / speed)
        ─▶ one task per request: client.stream(...) ─▶ TTFT, end-to-end, error type
    executors' /metrics (before, after) ─▶ cold starts;   usage query (before, after) ─▶ cost

Open loop: an arrival is sent at its time whether or not earlier ones have answered. At most
``max_inflight`` requests are outstanding; an arrival beyond that is *shed* by the replayer
and counted as the error ``shed_client`` (like a gateway's "overloaded", it is not retried).
Each request streams, so TTFT is the time to its first chunk carrying tokens; it asks for
exactly its (capped) output tokens with ``ignore_eos``. Prompts are words, one per prompt
token of the trace (capped by ``max_prompt_tokens``): token counts are approximate.

Cold starts come from the executors' own counters (``adapter_requests_cold``: the request's
adapter was not in GPU memory when it arrived; ``adapter_requests_warm``: it was), scraped
from each executor's Prometheus endpoint before and after; without endpoints they are
reported as unknown. Cost comes from the tenant's usage totals before and after, priced by
:mod:`vajra.policies.billing`.

Errors: a request's failure is counted by its error code, never raised; a failure to reach
the cluster at the start (ping, usage) raises the SDK's typed error. Cancellation (Ctrl-C)
cancels every request in flight; nothing is reported then.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

from vajra.client import AsyncClient, VajraError
from vajra.policies.billing import Prices, inference_cost_usd
from vajra.traces._replay_support import (
    ProgressBar,
    adapter_loads,
    read_counters,
    summary,
    usage_totals,
    wait_for_usage,
)
from vajra.traces._trace import Trace, TraceError

_WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "then", "it", "ran", "far", "away")


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """How to replay. ``speed`` 10 sends ten times faster than the trace; ``timeout_s``
    bounds each request; ``settle_s`` bounds the wait for the ledger's totals at the end."""

    speed: float = 1.0
    max_inflight: int = 256
    max_prompt_tokens: int = 128
    max_output_tokens: int = 16
    timeout_s: float = 60.0
    settle_s: float = 10.0
    progress: bool = False

    def check(self) -> None:
        """Raise :class:`TraceError` for an option out of range."""
        if not math.isfinite(self.speed) or self.speed <= 0:
            raise TraceError(f"speed must be finite and > 0, got {self.speed}", column="speed")
        for label in ("max_inflight", "max_prompt_tokens", "max_output_tokens"):
            if getattr(self, label) < 1:
                raise TraceError(f"{label} must be >= 1", column=label)
        if not self.timeout_s > 0 or not self.settle_s >= 0:
            raise TraceError("timeout_s must be > 0 and settle_s >= 0", column="timeout_s")


@dataclass(slots=True)
class _Tally:
    ttft_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    completed: int = 0
    inflight: int = 0
    output_tokens: int = 0


def prompt_of(tokens: int) -> str:
    """A prompt of ``tokens`` words (at least one)."""
    n = max(1, tokens)
    return " ".join(_WORDS[i % len(_WORDS)] for i in range(n))


async def replay(
    client: AsyncClient,
    trace: Trace,
    adapters: Sequence[str | None],
    options: ReplayOptions,
    *,
    metrics_urls: Sequence[str] = (),
    prices: Prices | None = None,
) -> dict[str, Any]:
    """Replay ``trace`` through ``client``; ``adapters[s]`` is the adapter (name, or None for
    the base model) of source ``s``. Returns every figure as a JSON-ready dict.

    Raises :class:`TraceError` when ``adapters`` does not cover the trace's sources or an
    option is out of range, and the SDK's error if the cluster cannot be reached at the start.
    """
    options.check()
    if len(adapters) < len(trace.sources):
        raise TraceError(
            f"{len(trace.sources)} sources but {len(adapters)} adapters", column="adapters"
        )
    prices = prices or Prices()
    await client.ping()
    usage_before = await usage_totals(client)
    counters_before = await read_counters(metrics_urls)
    tally = _Tally()
    t = trace.t_ms - (trace.t_ms[0] if len(trace) else 0.0)
    prompt_cache: dict[int, str] = {}
    wall_start = time.perf_counter()
    with ProgressBar(len(trace), enabled=options.progress, label=trace.name) as bar:
        async with trio.open_nursery() as nursery:
            start = trio.current_time() + 0.05
            for i in range(len(trace)):
                due = start + float(t[i]) / 1000.0 / options.speed
                await trio.sleep_until(due)
                tally.lag_ms.append((trio.current_time() - due) * 1000.0)
                if tally.inflight >= options.max_inflight:
                    tally.errors["shed_client"] += 1
                    bar.advance()
                    continue
                p_tokens = min(int(trace.prompt_tokens[i]), options.max_prompt_tokens)
                prompt = prompt_cache.get(p_tokens)
                if prompt is None:
                    prompt = prompt_cache[p_tokens] = prompt_of(p_tokens)
                out_tokens = max(1, min(int(trace.output_tokens[i]), options.max_output_tokens))
                tally.inflight += 1
                nursery.start_soon(
                    _one,
                    client,
                    prompt,
                    adapters[int(trace.source[i])],
                    out_tokens,
                    options.timeout_s,
                    tally,
                    bar,
                )
    send_s = time.perf_counter() - wall_start
    usage_after = await wait_for_usage(
        client, usage_before, tally.completed + sum(tally.errors.values()), options.settle_s
    )
    counters_after = await read_counters(metrics_urls)
    return _report(
        trace,
        options,
        tally,
        send_s,
        usage_before,
        usage_after,
        counters_before,
        counters_after,
        prices,
        metrics_urls,
    )


async def _one(
    client: AsyncClient,
    prompt: str,
    adapter: str | None,
    max_tokens: int,
    timeout_s: float,
    tally: _Tally,
    bar: ProgressBar,
) -> None:
    """Send one request and record its times or its error type; never raises a VajraError."""
    sent = trio.current_time()
    first: float | None = None
    tokens = 0
    try:
        # a safety net beyond the SDK's own deadline, so a lost reply cannot hang the replay
        with trio.fail_after(timeout_s + 10.0):
            async with client.stream(
                prompt, adapter, max_tokens=max_tokens, ignore_eos=True, timeout_s=timeout_s
            ) as chunks:
                async for chunk in chunks:
                    if chunk.token_ids and first is None:
                        first = trio.current_time()
                    tokens += len(chunk.token_ids)
    except VajraError as exc:
        tally.errors[exc.code.value] += 1
    except trio.TooSlowError:
        tally.errors["client_timeout"] += 1
    else:
        done = trio.current_time()
        tally.completed += 1
        tally.output_tokens += tokens
        tally.e2e_ms.append((done - sent) * 1000.0)
        tally.ttft_ms.append(((first if first is not None else done) - sent) * 1000.0)
    finally:
        tally.inflight -= 1
        bar.advance()


def _report(
    trace: Trace,
    options: ReplayOptions,
    tally: _Tally,
    send_s: float,
    usage_before: dict[str, float],
    usage_after: dict[str, float],
    counters_before: dict[str, float] | None,
    counters_after: dict[str, float] | None,
    prices: Prices,
    metrics_urls: Sequence[str],
) -> dict[str, Any]:
    used = {k: usage_after[k] - usage_before.get(k, 0.0) for k in usage_after}
    billed_ms = used.get("billed_ms", used.get("gpu_ms", 0.0))
    cost = inference_cost_usd(
        billed_ms,
        gpu_price_per_hour=prices.gpu_price_per_hour,
        tenancy_factor=prices.tenancy_factor,
    )
    cold: dict[str, Any] = {"source": "unknown: no executor metrics endpoints"}
    if counters_before is not None and counters_after is not None:
        c = counters_after["adapter_requests_cold"] - counters_before["adapter_requests_cold"]
        w = counters_after["adapter_requests_warm"] - counters_before["adapter_requests_warm"]
        cold = {
            "source": "executors' adapter_requests_cold / adapter_requests_warm counters",
            "executors": len(metrics_urls),
            "cold": int(c),
            "warm": int(w),
            "rate": round(c / (c + w), 4) if c + w else None,
            "loads": adapter_loads(counters_before, counters_after),
        }
    sent = len(trace) - tally.errors.get("shed_client", 0)
    n_requests = int(used.get("requests", 0))
    return {
        "trace": trace.name,
        "arrivals": len(trace),
        "sources": len(trace.sources),
        "trace_duration_s": round(trace.duration_s, 3),
        "options": asdict(options),
        "sent": sent,
        "completed": tally.completed,
        "errors": dict(sorted(tally.errors.items())),
        "error_rate": round(1 - tally.completed / len(trace), 4) if len(trace) else 0.0,
        "wall_s": round(send_s, 3),
        "offered_rate_per_s": round(len(trace) / max(1e-9, trace.duration_s / options.speed), 3)
        if trace.duration_s
        else None,
        "ttft_ms": summary(tally.ttft_ms),
        "e2e_ms": summary(tally.e2e_ms),
        "dispatch_lag_ms": summary(tally.lag_ms),
        "output_tokens": tally.output_tokens,
        "cold_starts": cold,
        "billing": {
            "requests": n_requests,
            "gpu_ms": round(used.get("gpu_ms", 0.0), 3),
            "billed_ms": round(billed_ms, 3),
            "cost_usd": cost,
            "cost_per_request_usd": cost / n_requests if n_requests else None,
            "prices": asdict(prices),
        },
    }
