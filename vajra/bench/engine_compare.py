"""Sections (f) and (g) of ``vajra bench engine``.

(f) The trace workload at one concurrency (every request there at the start) through four
    systems in the same run: (i) transformers' static batching (``generate`` on batches of
    ``concurrency`` prompts in arrival order, left-padded together, greedy, each batch until its
    longest output), (ii) transformers' own continuous batching (the manager that
    ``generate_batch`` runs, fed request by request so that each has its own output length,
    at most ``concurrency`` requests per batch, cut off after ``cb_time_limit_s``), (iii) the
    baseline engine, (iv) the current engine. Tokens/s counts only the tokens each request
    asked for (static batching's extra tokens are waste).
(g) The trace workload with as many distinct adapters as requests in flight (32 and 128, ranks
    mixed), against the same workload base-only on the same engine; every request there at
    the start (closed loop: ``count`` in flight until the last), so that both runs measure
    what the engine can do rather than the trace's arrival rate (on an H200, with arrivals,
    both runs at 32 kept up with the trace and gave equal tokens/s while the adapters' steps
    took 2.3x as long). Before each count's timed
    runs, one wave of ``count`` trace requests base-only and one with the adapters run
    untimed at that concurrency, to their full output lengths: what a batch shape costs the
    first time (Triton compiling the LoRA kernels for its rank width, allocator growth)
    falls outside both timings. On an H200 the first form of this section timed those costs,
    and they landed on whichever run met the shape first; on the 2-core CPU, with warm-up
    requests of 4 output tokens, the first timed run (base-only at 32) was still about a
    quarter slower than the next ones. Then ``adapter_pairs`` timed pairs, base-only then
    adapters, alternate; ``base_tok_s``, ``adapters_tok_s`` and the latencies are medians
    over the runs, ``adapters_vs_base`` the median of the pairs' ratios (``pairs_vs_base``
    lists them). Each count also reports what its adapters weigh (``adapter_bytes``: every
    rank row of the ``count`` adapters, which a step with all of them in its rows must read)
    and ``weights_bound_vs_base``: base weights / (base weights + those adapter bytes), the
    ratio a step bound by reading weights alone would reach (KV reads, the same in both runs,
    raise it somewhat).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from vajra.bench.engine_sections import BenchContext, run_level
from vajra.bench.engine_trace import BenchRequest
from vajra.bench.lora_models import random_adapter, sync_device
from vajra.bench.result_file import Progress
from vajra.gpu.model import load_model


def compare_section(ctx: BenchContext) -> dict[str, Any]:
    """(f); see the module docstring."""
    n = ctx.config.compare_concurrency
    requests = ctx.trace(ctx.requests_for(n), "f-", arrivals=False)
    wanted = sum(r.max_tokens for r in requests)
    loaded = load_model(ctx.model_dir, device=ctx.device, dtype=ctx.dtype)
    inputs = [list(loaded.tokenizer.encode(r.prompt)) for r in requests]
    pad = loaded.tokenizer.pad_token_id or 0
    result: dict[str, Any] = {"concurrency": n, "requests": len(requests), "wanted_tokens": wanted}
    result["static_generate"] = _static(loaded.model, inputs, requests, n, pad)
    ctx.log(f"(f) static generate: {result['static_generate']}")
    result["transformers_cb"] = _transformers_cb(ctx, loaded.model, inputs, requests, n)
    ctx.log(f"(f) transformers continuous batching: {result['transformers_cb']}")
    del loaded
    for kind in ("baseline", "current"):
        entry = run_level(ctx, kind, requests, n)
        result[kind] = entry
        ctx.log(f"(f) {kind}: tok/s {entry['output_tok_s']}")
    current = result["current"]["output_tok_s"]
    for other in ("baseline", "static_generate", "transformers_cb"):
        rate = result[other].get("output_tok_s")
        result[f"current_vs_{other}"] = round(current / rate, 3) if rate else None
    return result


def _static(
    model: Any, inputs: list[list[int]], requests: list[BenchRequest], n: int, pad: int
) -> dict[str, Any]:
    device = next(model.parameters()).device
    _generate(model, [inputs[0][:8]], 2, pad, device)  # warm-up
    sync_device(device)
    start = time.perf_counter()
    generated = 0
    for i in range(0, len(requests), n):
        batch = inputs[i : i + n]
        longest = max(r.max_tokens for r in requests[i : i + n])
        _generate(model, batch, longest, pad, device)
        generated += len(batch) * longest
    sync_device(device)
    seconds = time.perf_counter() - start
    wanted = sum(r.max_tokens for r in requests)
    return {
        "seconds": round(seconds, 3),
        "output_tok_s": round(wanted / seconds, 2),
        "generated_tokens": generated,
        "wasted_fraction": round(1 - wanted / generated, 4),
    }


def _generate(
    model: Any, batch: Sequence[list[int]], new_tokens: int, pad: int, device: torch.device
) -> None:
    width = max(len(ids) for ids in batch)
    ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
    with torch.inference_mode():
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=pad,
        )


def _transformers_cb(
    ctx: BenchContext,
    model: Any,
    inputs: list[list[int]],
    requests: list[BenchRequest],
    n: int,
) -> dict[str, Any]:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    page = 256
    longest = max(len(x) for x in inputs) + max(r.max_tokens for r in requests)
    blocks = n * (-(-longest // page) + 1) + 4
    # transformers renamed block_size to page_size in 5.2x; the GPU machine's may be older
    accepted = inspect.signature(ContinuousBatchingConfig).parameters
    sizing: dict[str, Any] = {"page_size" if "page_size" in accepted else "block_size": page}
    cb_config = ContinuousBatchingConfig(
        **sizing,
        num_blocks=blocks,
        max_batch_tokens=ctx.config.max_batch_tokens,
        max_requests_per_batch=n,
        use_cuda_graph=False,
    )
    gen_config = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False, max_new_tokens=max(r.max_tokens for r in requests), pad_token_id=0
    )
    wanted = {r.request_id: r.max_tokens for r in requests}
    done: dict[str, int] = {}
    deadline = time.perf_counter() + ctx.config.cb_time_limit_s
    try:
        start = time.perf_counter()
        with model.continuous_batching_context_manager(
            generation_config=gen_config,
            continuous_batching_config=cb_config,
            block=True,
            timeout=10,
            warmup=False,
        ) as manager:
            for r, ids in zip(requests, inputs, strict=True):
                manager.add_request(ids, request_id=r.request_id, max_new_tokens=r.max_tokens)
            while len(done) < len(requests) and time.perf_counter() < deadline:
                out = manager.get_result(timeout=1.0)
                if out is not None and out.is_finished():
                    done[out.request_id] = len(out.generated_tokens)
                elif out is None and not manager.is_running():
                    break
            seconds = time.perf_counter() - start
            if len(done) < len(requests):
                manager.stop(block=True, timeout=10, hard_stop=True)
    except Exception as exc:  # a third-party path on an unusual device: report, don't crash
        return {"error": f"{type(exc).__name__}: {exc}"}
    tokens = sum(min(v, wanted[k]) for k, v in done.items())
    return {
        "seconds": round(seconds, 3),
        "output_tok_s": round(tokens / seconds, 2) if tokens else None,
        "finished": len(done),
        "cut_short": len(done) < len(requests),
        "page_size": page,
        "num_blocks": blocks,
        "max_batch_tokens": ctx.config.max_batch_tokens,
    }


def adapter_section(ctx: BenchContext, progress: Progress = lambda _: None) -> dict[str, Any]:
    """(g); see the module docstring. ``progress`` gets the section so far after each adapter
    count, so a run cut short keeps the counts it finished."""
    from vajra.gpu.lora import pack_adapter, read_adapter_tensors

    cfg = ctx.config
    most = max(cfg.adapter_counts)
    engine, _ = ctx.engine(
        "current", max_batch_size=most, max_model_len=ctx.request_len, max_adapters=most
    )
    residency = engine.adapters
    if residency is None:
        return {"error": "the engine has no adapter slots"}
    slots, ranks, sizes = [], [], []
    for i in range(most):
        rank = cfg.adapter_ranks[i % len(cfg.adapter_ranks)]
        adapter = random_adapter(
            ctx.facts.spec, rank=rank, alpha=2 * rank, seed=i + 1, max_rank=max(cfg.adapter_ranks)
        )
        host = pack_adapter(
            adapter.manifest,
            read_adapter_tensors(adapter.weights),
            residency.layout,
            dtype=residency.dtype,
        )
        slots.append(residency.load(host))
        ranks.append(rank)
        sizes.append(host.buffer.numel() * host.buffer.element_size())
    ctx.log(f"(g) loaded {most} adapters, ranks {sorted(set(ranks))}")
    results = []
    for count in cfg.adapter_counts:
        for name, warm_slots in (("b", None), ("l", slots[:count])):
            warm = ctx.trace(count, f"g{count}w{name}-", adapter_slots=warm_slots, arrivals=False)
            run_level(ctx, "current", warm, count, engine=engine)
        n_requests = ctx.requests_for(count)
        runs: dict[str, list[dict[str, Any]]] = {"b": [], "l": []}
        zero = dict.fromkeys(engine_counters(engine), 0)
        counters = {"b": dict(zero), "l": dict(zero)}
        for pair in range(max(1, cfg.adapter_pairs)):
            for name, run_slots in (("b", None), ("l", slots[:count])):
                trace = ctx.trace(
                    n_requests, f"g{count}{name}{pair}-", adapter_slots=run_slots, arrivals=False
                )
                before = engine_counters(engine)
                runs[name].append(run_level(ctx, "current", trace, count, engine=engine))
                after = engine_counters(engine)
                for key in before:
                    counters[name][key] += after[key] - before[key]
        base, lora = runs["b"], runs["l"]
        ratios = [
            round(lo["output_tok_s"] / b["output_tok_s"], 3)
            for b, lo in zip(base, lora, strict=True)
            if b["output_tok_s"] and lo["output_tok_s"]  # None: a run that gave no tokens
        ]
        entry = {
            "adapters": count,
            "concurrency": count,
            "requests": n_requests,
            "pairs": len(base),
            "base_tok_s": _median(base, "output_tok_s"),
            "adapters_tok_s": _median(lora, "output_tok_s"),
            "adapters_vs_base": statistics.median(ratios) if ratios else None,
            "pairs_vs_base": ratios,
            "adapter_bytes": sum(sizes[:count]),
            "weights_bound_vs_base": round(
                ctx.facts.weight_bytes / (ctx.facts.weight_bytes + sum(sizes[:count])), 3
            ),
            "base_itl_p50_ms": _median(base, "itl_p50_ms"),
            "adapters_itl_p50_ms": _median(lora, "itl_p50_ms"),
            "adapters_itl_p99_ms": _median(lora, "itl_p99_ms"),
            "errors": sum(r["errors"] for r in base + lora),
            "cut_short": any(r["cut_short"] for r in base + lora),
            "base_counters": counters["b"],
            "adapters_counters": counters["l"],
        }
        ctx.log(f"(g) {entry}")
        results.append(entry)
        progress({"ranks": list(cfg.adapter_ranks), "results": results})
    return {"ranks": list(cfg.adapter_ranks), "results": results}


def engine_counters(engine: Any) -> dict[str, int]:
    """Counters that tell two runs of one engine apart: decode steps replayed from a CUDA
    graph or run on the static path (:mod:`vajra.gpu.decode_graphs`), preemptions, prefix
    hits; zeros for what the engine does not have."""
    graphs = getattr(engine, "decode_graphs", None)
    kv = engine.kv_stats() if hasattr(engine, "kv_stats") else {}
    return {
        "graph_replays": graphs.stats.replays if graphs is not None else 0,
        "static_eager_steps": graphs.stats.eager if graphs is not None else 0,
        "preemptions": int(kv.get("preemptions", 0)),
        "prefix_hits": int(kv.get("prefix_hits", 0)),
    }


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over ``runs`` (those that have it), rounded as the runs are."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None
