"""``vajra bench engine``: the engine alone, driven through ``step()`` as the executor drives it.

Sections (each a key of the JSON; ``--skip`` leaves some out):

(a) ``a_concurrency``: output tokens/s, inter-token latency (ITL) and TTFT p50/p99 at 1, 8, 32
    and 128 requests in flight, on requests from the Azure LLM inference trace (prompt and
    output lengths, arrival times sped up by ``rate_scale``; lengths capped);
(b) ``b_context``: the time of one decode step of 8 rows against context length;
(c) ``c_prefill_interference``: TTFT of a 2,000-token prompt arriving while 32 streams decode,
    and the streams' ITL p50/p99 before and during its prefill;
(d) ``d_kv_memory``: KV memory allocated against live tokens, from the engine's ``kv_stats()``
    during (a) and (f) (null for an engine without it);
(e) ``e_prefix_cache``: the prefix-cache hit rate of 32 requests sharing a 500-token system
    prompt (from ``kv_stats()``; null without it), and their TTFT;
(f) ``f_comparison``: the workload of (a) at 32 in flight through transformers' static
    ``generate``, transformers' continuous batching, the baseline engine
    (:mod:`vajra.bench.baseline_engine`, the engine before the paged-KV rewrite) and the
    current engine, in the same run;
(g) ``g_adapters``: tokens/s with 32 and 128 distinct adapters against base-only on the same
    engine.

(b), (c) and (e) run on the current and the baseline engine. Without ``--model`` the model is
built in a temporary directory (:func:`~vajra.bench.engine_model.build_bench_model`).
``--quick`` is a short form that checks everything runs. Dependency-light like
:mod:`vajra.bench.adapters`: torch and transformers only, so ``python -m vajra.bench.engine``
runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from vajra.bench.engine_args import (
    EngineBenchConfig,
    add_engine_arguments,
    config_from_args,
    skipped_sections,
)
from vajra.bench.engine_compare import adapter_section, compare_section
from vajra.bench.engine_model import EngineKind, build_bench_model, model_facts
from vajra.bench.engine_report import kv_memory_section, section_errors, summary_lines
from vajra.bench.engine_sections import (
    BenchContext,
    concurrency_section,
    context_section,
    interference_section,
    prefix_section,
)
from vajra.bench.engine_trace import PromptMaker, TraceShape, read_trace
from vajra.bench.result_file import Progress, partial_writer, write_result

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def run_engine_bench(
    config: EngineBenchConfig,
    *,
    skip: frozenset[str] = frozenset(),
    log: Callable[[str], None] = lambda _: None,
    partial: Progress = lambda _: None,
) -> dict[str, Any]:
    """Run every section not in ``skip`` (letters a-g); a section that fails records
    ``{"error": ...}`` and the others still run. ``partial`` gets the result so far after
    each section, so a run cut short by a time limit keeps what it measured."""
    cuda = torch.cuda.is_available() if config.device is None else config.device.startswith("cuda")
    device = config.device or ("cuda" if cuda else "cpu")
    dtype = config.dtype or ("bfloat16" if cuda else "float32")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vajra-bench-engine-") as tmp:
        model_dir = config.model_dir or build_bench_model(
            Path(tmp) / "model", shape=config.model_shape, seed=config.seed
        )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        ctx = BenchContext(
            config=config,
            model_dir=model_dir,
            device=device,
            dtype=dtype,
            facts=model_facts(model_dir, _DTYPES[dtype]),
            prompts=PromptMaker(tokenizer, seed=config.seed),
            rows=read_trace(),
            shape=TraceShape(
                max_prompt_tokens=config.max_prompt_tokens,
                max_output_tokens=config.max_output_tokens,
                prompt_scale=config.prompt_scale,
                rate_scale=config.rate_scale,
            ),
            log=log,
        )
        result: dict[str, Any] = {"meta": _meta(ctx)}
        seconds: dict[str, float] = {}

        def section(key: str, run: Callable[[], Any]) -> None:
            if key[0] in skip:
                result[key] = None
                return
            begin = time.perf_counter()
            try:
                result[key] = run()
            except Exception as exc:  # one failing section must not lose the others' figures
                log(traceback.format_exc())
                result[key] = {"error": f"{type(exc).__name__}: {exc}"}
            seconds[key] = round(time.perf_counter() - begin, 1)
            log(f"{key}: done in {seconds[key]} s")
            partial(result)

        both: tuple[EngineKind, ...] = ("current", "baseline")
        section("a_concurrency", lambda: concurrency_section(ctx))
        section("b_context", lambda: {k: context_section(ctx, k) for k in both})
        section("c_prefill_interference", lambda: {k: interference_section(ctx, k) for k in both})
        section("e_prefix_cache", lambda: {k: prefix_section(ctx, k) for k in both})
        section("f_comparison", lambda: compare_section(ctx))
        section(
            "g_adapters",
            lambda: adapter_section(ctx, lambda g: partial({**result, "g_adapters": g})),
        )
        result["d_kv_memory"] = None if "d" in skip else kv_memory_section(result)
        result["meta"]["section_seconds"] = seconds
    result["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    result["meta"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return {k: result[k] for k in sorted(result)}


def _meta(ctx: BenchContext) -> dict[str, Any]:
    import transformers

    from vajra.gpu import load_engine

    cuda = ctx.device.startswith("cuda")
    config = dataclasses.asdict(ctx.config)
    config["model_dir"] = None if ctx.config.model_dir is None else str(ctx.config.model_dir)
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name(ctx.device) if cuda else "cpu",
        "dtype": ctx.dtype,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "current_engine": f"{load_engine.__module__}.load_engine"
        f"({', '.join(_params(load_engine))})",
        "model": "built" if ctx.config.model_dir is None else str(ctx.config.model_dir),
        "model_shape": ctx.config.model_shape if ctx.config.model_dir is None else None,
        "max_position_embeddings": ctx.facts.max_positions,
        "kv_bytes_per_token": ctx.facts.kv_bytes_per_token,
        "workload": ctx.shape.describe(),
        "config": config,
    }


def _params(func: Callable[..., Any]) -> list[str]:
    import inspect

    return list(inspect.signature(func).parameters)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vajra bench engine", description=(__doc__ or "").split("\n\n")[0]
    )
    add_engine_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed options: the JSON to ``args.json``, a short table to stdout; 1 if a
    section failed."""
    path = Path(args.json)
    result = run_engine_bench(
        config_from_args(args),
        skip=skipped_sections(args),
        log=lambda line: print(line, file=sys.stderr, flush=True),
        partial=partial_writer(path),
    )
    write_result(path, result)
    print("\n".join(summary_lines(result)))
    return 1 if section_errors(result) else 0


if __name__ == "__main__":
    raise SystemExit(main())
