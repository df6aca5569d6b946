"""Drive an engine with ``step()`` as the executor does, and turn what happened into figures.

:func:`drive` admits each request once its arrival time has passed and fewer than
``concurrency`` are in flight (closed loop: a request that has arrived waits outside the engine
while ``concurrency`` are running), calls ``engine.step`` until every request has finished, and
records when each request's tokens came out. :func:`summarize` turns that into tokens/s,
inter-token latency (ITL) and time to first token (TTFT); :func:`kv_summary` summarises the
engine's ``kv_stats()`` samples, when it has that method.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vajra.bench.engine_trace import BenchRequest
from vajra.gpu import Engine, GenerationRequest, SamplingParams, StepOutput


@dataclass
class RequestRecord:
    """What happened to one request; times are seconds since the run started."""

    request: BenchRequest
    admitted_s: float
    token_times: list[float] = field(default_factory=list)  # one entry per token
    finished_s: float | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    error: str | None = None


@dataclass
class RunRecord:
    records: dict[str, RequestRecord]
    steps: list[tuple[float, float]]  # (start, end) of every step() call
    kv_samples: list[dict[str, Any]]
    cut_short: bool = False  # the time limit ended the run; the figures cover what finished


def generation_request(request: BenchRequest) -> GenerationRequest:
    params = SamplingParams(max_tokens=request.max_tokens, temperature=0.0)
    return GenerationRequest(request.request_id, request.prompt, params, request.adapter_slot)


def kv_stats_of(engine: Engine) -> Callable[[], dict[str, Any]] | None:
    """The engine's ``kv_stats`` method, if it has one."""
    stats = getattr(engine, "kv_stats", None)
    return stats if callable(stats) else None


def drive(
    engine: Engine,
    requests: Sequence[BenchRequest],
    *,
    concurrency: int,
    time_limit_s: float = math.inf,
    on_step: Callable[[float, list[StepOutput]], None] | None = None,
) -> RunRecord:
    """Run ``requests`` through ``engine`` (see the module docstring). At ``time_limit_s`` the
    requests still held are aborted and the run is marked ``cut_short``."""
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    records: dict[str, RequestRecord] = {}
    in_flight: set[str] = set()
    steps: list[tuple[float, float]] = []
    kv_samples: list[dict[str, Any]] = []
    stats = kv_stats_of(engine)
    cut_short = False
    start = time.perf_counter()
    while pending or in_flight:
        now = time.perf_counter() - start
        if now > time_limit_s and not cut_short:
            cut_short = True
            pending.clear()
            outputs = engine.step([], sorted(in_flight))
            _record(records, outputs, time.perf_counter() - start, in_flight)
            continue
        admit: list[BenchRequest] = []
        while pending and pending[0].arrival_s <= now and len(in_flight) < concurrency:
            request = pending.popleft()
            admit.append(request)
            in_flight.add(request.request_id)
            records[request.request_id] = RequestRecord(request, admitted_s=now)
        if not admit and not in_flight:
            time.sleep(max(0.0, min(pending[0].arrival_s - now, 0.05)))
            continue
        if not admit and not engine.has_work():  # held requests vanished without an output
            for request_id in in_flight:
                records[request_id].finish_reason = "error"
                records[request_id].error = "the engine dropped the request without an output"
            in_flight.clear()
            continue
        before = time.perf_counter() - start
        outputs = engine.step([generation_request(r) for r in admit], [])
        after = time.perf_counter() - start
        steps.append((before, after))
        _record(records, outputs, after, in_flight)
        if stats is not None:
            kv_samples.append(dict(stats()))
        if on_step is not None:
            on_step(after, outputs)
    return RunRecord(records, steps, kv_samples, cut_short)


def _record(
    records: dict[str, RequestRecord], outputs: list[StepOutput], at: float, in_flight: set[str]
) -> None:
    for out in outputs:
        record = records.get(out.request_id)
        if record is None:
            continue
        record.token_times += [at] * len(out.token_ids)
        record.prompt_tokens = out.prompt_tokens or record.prompt_tokens
        if out.finished:
            record.finished_s = at
            record.finish_reason = out.finish_reason
            record.error = None if out.error is None else str(out.error)
            in_flight.discard(out.request_id)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def intervals(times: Sequence[float]) -> list[float]:
    """Gaps between consecutive tokens; a step that gave k tokens at once counts k gaps of
    1/k of its interval each."""
    gaps: list[float] = []
    i = 1
    while i < len(times):
        j = i
        while j + 1 < len(times) and times[j + 1] == times[i]:
            j += 1
        k = j - i + 1
        gaps += [(times[i] - times[i - 1]) / k] * k
        i = j + 1
    return gaps


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000.0, 3)


def summarize(run: RunRecord) -> dict[str, Any]:
    """Output tokens/s over the run, ITL and TTFT (from admission) p50/p99 in ms, the mean
    number of requests in flight, errors."""
    records = list(run.records.values())
    tokens = sum(len(r.token_times) for r in records)
    first = min((r.admitted_s for r in records), default=0.0)
    last = max((r.finished_s or (r.token_times or [0.0])[-1] for r in records), default=0.0)
    elapsed = max(last - first, 1e-9)
    itl = [gap for r in records for gap in intervals(r.token_times)]
    ttft = [r.token_times[0] - r.admitted_s for r in records if r.token_times]
    busy = sum((r.finished_s or last) - r.admitted_s for r in records)
    errors = [r for r in records if r.finish_reason == "error"]
    step_s = [end - begin for begin, end in run.steps]
    return {
        "requests": len(records),
        "finished": sum(1 for r in records if r.finish_reason in ("stop", "length")),
        "output_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "seconds": round(elapsed, 3),
        "output_tok_s": round(tokens / elapsed, 2),
        "itl_p50_ms": ms(percentile(itl, 50)),
        "itl_p99_ms": ms(percentile(itl, 99)),
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "mean_in_flight": round(busy / elapsed, 2),
        "steps": len(run.steps),
        "step_p50_ms": ms(percentile(step_s, 50)),
        "errors": len(errors),
        "first_error": errors[0].error if errors else None,
        "cut_short": run.cut_short,
    }


def kv_summary(samples: Sequence[dict[str, Any]], bytes_per_token: int) -> dict[str, Any] | None:
    """From the engine's ``kv_stats()`` after every step: the peak of each figure, and how much
    of the KV memory held live tokens (mean over the steps, and at the step of peak use).
    ``live_fraction_of_used`` counts only the blocks in use (when the engine reports blocks)."""
    if not samples:
        return None
    numeric = {
        key
        for sample in samples
        for key, value in sample.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    peak = {key: max(s.get(key) or 0 for s in samples) for key in sorted(numeric)}
    fractions, used_fractions = [], []
    for s in samples:
        allocated, live = s.get("allocated_bytes"), s.get("live_tokens")
        if not allocated or live is None:
            continue
        fractions.append(live * bytes_per_token / allocated)
        used, total = s.get("used_blocks"), s.get("total_blocks")
        if used and total:
            used_fractions.append(live * bytes_per_token / (allocated * used / total))
    at_peak = max(samples, key=lambda s: s.get("live_tokens") or 0)
    return {
        "bytes_per_token": bytes_per_token,
        "peak": peak,
        "at_peak_live": at_peak,
        "live_fraction_mean": _mean(fractions),
        "live_fraction_of_used_mean": _mean(used_fractions),
    }


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
