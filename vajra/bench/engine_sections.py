"""Sections (a), (b), (c) and (e) of ``vajra bench engine``, and the context they share.

(a) output tokens/s, ITL and TTFT at each concurrency level on the trace workload;
(b) time of one decode step against context length;
(c) TTFT of a long prompt arriving while streams decode, and the streams' ITL before and
    during its prefill;
(e) the prefix-cache hit rate of requests sharing a system prompt (and their TTFT).
(d), KV memory against live tokens, is gathered from the ``kv_stats()`` samples of (a) and (f).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import DeviceType, ProfilerActivity, profile

from vajra.bench.bandwidth import copy_bandwidth, decode_floor_s
from vajra.bench.engine_args import EngineBenchConfig
from vajra.bench.engine_driver import (
    drive,
    generation_request,
    intervals,
    kv_stats_of,
    kv_summary,
    ms,
    percentile,
    summarize,
)
from vajra.bench.engine_model import EngineKind, ModelFacts, make_engine
from vajra.bench.engine_trace import (
    BenchRequest,
    PromptMaker,
    TraceRow,
    TraceShape,
    trace_requests,
)
from vajra.gpu.interface import Engine, StepOutput
from vajra.gpu.paged_attention import decode_kernel_error

#: Measured once per device and run: both engines of (b) are judged against the same floor.
_bandwidth = functools.cache(copy_bandwidth)


@dataclass
class BenchContext:
    """The model, the workload sources and the settings every section uses."""

    config: EngineBenchConfig
    model_dir: Path
    device: str
    dtype: str
    facts: ModelFacts
    prompts: PromptMaker
    rows: list[TraceRow]
    shape: TraceShape
    log: Callable[[str], None]

    @property
    def request_len(self) -> int:
        """``max_model_len`` for the trace workloads: the longest prompt plus its output."""
        return self.config.max_prompt_tokens + self.config.max_output_tokens + 8

    def engine(
        self, kind: EngineKind, *, max_batch_size: int, max_model_len: int, max_adapters: int = 0
    ) -> tuple[Engine, dict[str, Any]]:
        """A fresh engine, warmed up by two short requests. Its KV cache (paged-KV engine) holds
        ``max_batch_size`` rows of ``max_model_len`` tokens plus a quarter, unless the
        configuration names a size."""
        kv_bytes = self.config.kv_cache_bytes or (
            self.facts.kv_bytes_per_token * max_batch_size * max_model_len * 5 // 4
        )
        engine, settings = make_engine(
            kind,
            self.model_dir,
            device=self.device,
            dtype=self.dtype,
            max_batch_size=max_batch_size,
            max_model_len=min(max_model_len, self.facts.max_positions),
            max_adapters=max_adapters,
            kv_cache_bytes=kv_bytes,
            max_batch_tokens=self.config.max_batch_tokens,
            decode_graphs=self.config.decode_graphs,
        )
        warm = [BenchRequest(f"warm{i}", self.prompts.prompt(16), 16, 2, 0.0) for i in range(2)]
        drive(engine, warm, concurrency=2)
        return engine, settings

    def trace(self, count: int, prefix: str, **kwargs: Any) -> list[BenchRequest]:
        """The first ``count`` requests of the trace workload (see ``trace_requests``)."""
        return trace_requests(self.rows, count, self.shape, self.prompts, prefix=prefix, **kwargs)

    def requests_for(self, concurrency: int) -> int:
        """Requests of the trace workload at ``concurrency``: as (a) has it, else twice as many."""
        levels = dict(zip(self.config.concurrency, self.config.requests_per_level, strict=True))
        return levels.get(concurrency, 2 * concurrency)


def run_level(
    ctx: BenchContext,
    kind: EngineKind,
    requests: list[BenchRequest],
    concurrency: int,
    *,
    max_adapters: int = 0,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """One trace run at ``concurrency`` on ``engine`` (a fresh one of ``kind`` if None)."""
    if engine is None:
        engine, _ = ctx.engine(
            kind,
            max_batch_size=concurrency,
            max_model_len=ctx.request_len,
            max_adapters=max_adapters,
        )
    run = drive(
        engine, requests, concurrency=concurrency, time_limit_s=ctx.config.level_time_limit_s
    )
    summary = summarize(run)
    summary["kv"] = kv_summary(run.kv_samples, ctx.facts.kv_bytes_per_token)
    return summary


def concurrency_section(ctx: BenchContext) -> dict[str, Any]:
    """(a): the trace workload at each concurrency level, on the current engine."""
    levels = []
    for n, count in zip(ctx.config.concurrency, ctx.config.requests_per_level, strict=True):
        requests = ctx.trace(count, f"a{n}-")
        entry = {"concurrency": n, **run_level(ctx, "current", requests, n)}
        ctx.log(f"(a) concurrency {n}: {_brief(entry)}")
        levels.append(entry)
    return {"workload": ctx.shape.describe(), "levels": levels}


#: (b)'s runs of ``context_steps`` per row with the static path: timed, operators counted,
#: without graphs, then ``_OUTSIDE_RUNS`` with the model skipped.
_OUTSIDE_RUNS = 4
_STEP_RUNS = 3 + _OUTSIDE_RUNS


def context_section(ctx: BenchContext, kind: EngineKind) -> dict[str, Any]:
    """(b): ``context_rows`` rows with prompts of each context length; once every row has its
    first token, the next ``context_steps`` steps are pure decode steps and are timed, against
    the step's memory-bandwidth floor (:mod:`vajra.bench.bandwidth`). When the engine replays
    CUDA graphs of decode steps (:mod:`vajra.gpu.decode_graphs`), as many steps more of the
    same rows run with the graphs switched off: ``graph_speedup`` is eager over graph p50;
    and four times as many with the model skipped (its logits reused): ``outside_model_ms``,
    the p50 of what a step costs besides its forward (cheap steps, so more of them: a p50 of
    16 varied by half between runs on a busy 2-core machine)."""
    cfg = ctx.config
    rows, steps = cfg.context_rows, cfg.context_steps
    max_len = min(max(cfg.contexts) + _STEP_RUNS * steps + 8, ctx.facts.max_positions)
    engine, _ = ctx.engine(kind, max_batch_size=rows, max_model_len=max_len)
    graphs = getattr(engine, "decode_graphs", None)  # vajra.gpu.decode_graphs, when it runs
    timed = (_STEP_RUNS if graphs is not None else 2) * steps + 1
    bandwidth = _bandwidth(ctx.device)
    results: list[dict[str, Any]] = []
    for context in cfg.contexts:
        if context + timed + 2 > max_len:
            results.append({"context": context, "skipped": f"model holds {max_len} positions"})
            continue
        requests = [
            BenchRequest(f"b{context}-{i}", ctx.prompts.prompt(context), context, timed + 2, 0.0)
            for i in range(rows)
        ]
        ids = {r.request_id for r in requests}
        started: set[str] = set()
        begin = time.perf_counter()
        admit = [generation_request(r) for r in requests]
        while started != ids:
            started |= {o.request_id for o in engine.step(admit, []) if o.token_ids}
            admit = []
        prefill_s = time.perf_counter() - begin
        step_s = _timed_steps(engine, steps)
        busy = ops_time_per_step(engine, steps, ctx.device)
        eager_s, outside_s = [], []
        if graphs is not None:  # the same rows, next steps, without the graphs: the control
            engine.decode_graphs = None  # type: ignore[attr-defined]
            try:
                eager_s = _timed_steps(engine, steps)
            finally:
                engine.decode_graphs = graphs  # type: ignore[attr-defined]
            with graphs.model_skipped():  # the first step runs the forward whose logits recur
                outside_s = _timed_steps(engine, _OUTSIDE_RUNS * steps + 1)[1:]
        _drain(engine, sorted(ids))
        p50 = percentile(step_s, 50) or 0.0
        floor = decode_floor_s(
            weight_bytes=ctx.facts.weight_bytes,
            kv_bytes_per_token=ctx.facts.kv_bytes_per_token,
            rows=rows,
            context=context + steps // 2,
            bandwidth=bandwidth,
        )
        entry = {
            "context": context,
            "rows": rows,
            "decode_steps": steps,
            "step_p50_ms": ms(p50),
            "step_p90_ms": ms(percentile(step_s, 90)),
            "ms_per_token": ms(p50 / rows),
            "floor_ms": ms(floor),
            "vs_floor": round(p50 / floor, 2),
            "prefill_s": round(prefill_s, 3),
            **busy,
        }
        if graphs is not None:
            eager = percentile(eager_s, 50) or 0.0
            entry |= {"eager_step_p50_ms": ms(eager), "graph_speedup": round(eager / p50, 2)}
            entry["outside_model_ms"] = ms(percentile(outside_s, 50))
        ctx.log(f"(b) {kind} context {context}: {entry}")
        results.append(entry)
    graph_facts: dict[str, object] = {"fused_layers": getattr(engine, "fused_layers", 0)}
    if getattr(engine, "fused_layers_error", None):  # a kernel failed its check: none fused
        graph_facts["fused_layers_error"] = engine.fused_layers_error  # type: ignore[attr-defined]
    if graphs is not None:
        graph_facts["decode_graphs"] = vars(graphs.stats)
    if getattr(engine, "decode_graphs_error", None):  # capture failed: the engine ran eagerly
        graph_facts["decode_graphs_error"] = engine.decode_graphs_error  # type: ignore[attr-defined]
    if kernel_error := decode_kernel_error(ctx.device):  # Triton could not build it: torch ran
        graph_facts["decode_kernel_error"] = kernel_error
    return {
        "rows": rows,
        "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "contexts": results,
        **graph_facts,
    }


def ops_time_per_step(engine: Engine, steps: int, device: str) -> dict[str, Any]:
    """``steps`` more steps under torch's profiler: on CUDA the kernels' device time per step
    (a step's wall time above it is host time the device waited for) and how many kernels a
    step runs (those a graph replays included), on the CPU the time in torch ops and their
    number per step; and the five kernels or ops that take most of the time."""
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step([], [])
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]

    def own_us(event: Any) -> float:
        return float(event.self_device_time_total if cuda else event.self_cpu_time_total)

    top = sorted(events, key=own_us, reverse=True)[:5]
    return {
        "ops_ms_per_step": round(sum(map(own_us, events)) / 1e3 / steps, 3),
        "ops_per_step": round(sum(e.count for e in events) / steps, 1),
        "top_ops": [
            {
                "name": e.key[:100],
                "ms_per_step": round(own_us(e) / 1e3 / steps, 3),
                "calls_per_step": round(e.count / steps, 1),
            }
            for e in top
        ],
    }


def _timed_steps(engine: Engine, steps: int) -> list[float]:
    """Seconds of each of ``steps`` engine steps with nothing admitted."""
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        engine.step([], [])
        times.append(time.perf_counter() - begin)
    return times


def interference_section(ctx: BenchContext, kind: EngineKind) -> dict[str, Any]:
    """(c): ``streams`` requests decode; then, ``interference_repeats`` times, the streams'
    ITL over ``interference_steps`` steps ("before"), and a ``long_prompt_tokens`` prompt is
    admitted: its TTFT, and the streams' token gaps that end between its admission and its
    first token ("during")."""
    cfg = ctx.config
    n = cfg.streams
    stream_tokens = (cfg.interference_steps + 32) * cfg.interference_repeats + 64
    max_len = max(cfg.stream_prompt_tokens + stream_tokens, cfg.long_prompt_tokens + 8) + 8
    engine, _ = ctx.engine(kind, max_batch_size=n + 1, max_model_len=max_len)
    times: dict[str, list[float]] = {}
    t0 = time.perf_counter()

    def step(admit: list[BenchRequest]) -> float:
        outputs: list[StepOutput] = engine.step([generation_request(r) for r in admit], [])
        now = time.perf_counter() - t0
        for out in outputs:
            times.setdefault(out.request_id, []).extend([now] * len(out.token_ids))
        return now

    streams = [
        BenchRequest(f"c{i}", ctx.prompts.prompt(cfg.stream_prompt_tokens), 0, stream_tokens, 0.0)
        for i in range(n)
    ]
    step(streams)
    while any(len(times.get(s.request_id, ())) < 2 for s in streams):
        step([])
    before: list[float] = []
    during: list[float] = []
    ttft: list[float] = []
    steps_to_first: list[int] = []
    for r in range(cfg.interference_repeats):
        mark = time.perf_counter() - t0
        for _ in range(cfg.interference_steps):
            step([])
        admitted = time.perf_counter() - t0
        long = BenchRequest(f"long{r}", ctx.prompts.prompt(cfg.long_prompt_tokens), 0, 2, 0.0)
        count = 1
        now = step([long])
        while not times.get(long.request_id):
            now = step([])
            count += 1
        ttft.append(now - admitted)
        steps_to_first.append(count)
        for s in streams:
            stamps = times[s.request_id]
            before += _gaps_ending_in(stamps, mark, admitted)
            during += _gaps_ending_in(stamps, admitted, now)
        while len(times[long.request_id]) < long.max_tokens:
            step([])
    _drain(engine, [s.request_id for s in streams])
    entry = {
        "streams": n,
        "stream_prompt_tokens": cfg.stream_prompt_tokens,
        "long_prompt_tokens": cfg.long_prompt_tokens,
        "repeats": cfg.interference_repeats,
        "ttft_ms": [ms(t) for t in ttft],
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "steps_to_first_token": steps_to_first,
        "itl_before_p50_ms": ms(percentile(before, 50)),
        "itl_before_p99_ms": ms(percentile(before, 99)),
        "itl_during_p50_ms": ms(percentile(during, 50)),
        "itl_during_p99_ms": ms(percentile(during, 99)),
    }
    ctx.log(f"(c) {kind}: {entry}")
    return entry


def prefix_section(ctx: BenchContext, kind: EngineKind) -> dict[str, Any]:
    """(e): ``prefix_requests`` requests, each the same ``system_prompt_tokens`` system prompt
    (BOS included) then 16-48 distinct tokens; the first arrives alone, the rest just after
    (so its prefix is computed before theirs is looked up). ``hit_rate`` is the engine's
    ``prefix_hits / prefix_queries`` over the run, in its own units (the paged-KV engine counts
    KV blocks); ``shared_prompt_token_fraction`` is the share of all prompt tokens that a
    perfect prefix cache would not compute again (the system prompt of every request but the
    first)."""
    cfg = ctx.config
    system = ctx.prompts.text(cfg.system_prompt_tokens - 1)
    requests = []
    for i in range(cfg.prefix_requests):
        tokens = cfg.system_prompt_tokens + 16 + (7 * i) % 33
        prompt = ctx.prompts.prompt(tokens, prefix=system)
        arrival = 0.0 if i == 0 else 0.001
        requests.append(BenchRequest(f"e{i}", prompt, tokens, cfg.prefix_output_tokens, arrival))
    max_len = cfg.system_prompt_tokens + 48 + cfg.prefix_output_tokens + 8
    engine, _ = ctx.engine(kind, max_batch_size=cfg.prefix_requests, max_model_len=max_len)
    stats = kv_stats_of(engine)
    first = dict(stats()) if stats is not None else {}
    run = drive(engine, requests, concurrency=cfg.prefix_requests)
    last = dict(stats()) if stats is not None else {}
    summary = summarize(run)
    hits = _delta(first, last, "prefix_hits")
    queries = _delta(first, last, "prefix_queries")
    shared = cfg.system_prompt_tokens * (cfg.prefix_requests - 1)
    entry = {
        "requests": cfg.prefix_requests,
        "system_prompt_tokens": cfg.system_prompt_tokens,
        "prefix_hits": hits,
        "prefix_queries": queries,
        "hit_rate": round(hits / queries, 4) if hits is not None and queries else None,
        "shared_prompt_token_fraction": round(shared / max(summary["prompt_tokens"], 1), 4),
        **{k: summary[k] for k in ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "seconds")},
    }
    ctx.log(f"(e) {kind}: {entry}")
    return entry


def _gaps_ending_in(stamps: list[float], start: float, end: float) -> list[float]:
    """Token gaps of one stream whose later token came out in ``(start, end]``."""
    gaps = intervals(stamps)
    return [gap for gap, at in zip(gaps, stamps[1:], strict=True) if start < at <= end]


def _drain(engine: Engine, request_ids: list[str]) -> None:
    engine.step([], request_ids)
    while engine.has_work():
        engine.step([], [])


def _delta(first: dict[str, Any], last: dict[str, Any], key: str) -> int | None:
    a, b = first.get(key), last.get(key)
    return None if a is None or b is None else int(b) - int(a)


def _brief(entry: dict[str, Any]) -> str:
    keys = ("output_tok_s", "itl_p50_ms", "itl_p99_ms", "ttft_p50_ms", "mean_in_flight", "seconds")
    return ", ".join(f"{k}={entry.get(k)}" for k in keys)
