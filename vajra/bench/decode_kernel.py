"""``vajra bench decode-kernel``: the paged decode attention kernel alone, plan by plan.

For the attention of a model shape (Llama-3.2-1B: 32 heads, 8 kv heads, 64 wide; Llama-3-8B:
128 wide), it times one layer's decode attention for batches of rows at a context length,
under the launch plan :func:`~vajra.gpu.paged_decode_kernel.launch_plan` picks, under each
plan of a small sweep (splits, tile, warps), and the torch reference (gather + SDPA). Each
case reports milliseconds per call (the median of ``--repeats`` timed calls after a warm-up),
the KV bytes read per second against the device's copy bandwidth
(:mod:`vajra.bench.bandwidth`), the largest error against the reference computed in
float32, the best plan, and how far the chosen plan is from it. Rows' blocks are shuffled
through the cache, and the block tables are ``--table-positions`` wide, as a CUDA graph's
are (:mod:`vajra.gpu.decode_graphs`).

Needs torch and triton only (the GPU machine has both). On the CPU the kernel runs only in
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported): the quick form
there checks the plumbing and the errors, not speed.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vajra.bench.bandwidth import copy_bandwidth
from vajra.bench.lora_models import sync_device
from vajra.bench.result_file import Progress, partial_writer, write_result
from vajra.gpu.paged_decode_kernel import (
    LaunchPlan,
    available,
    launch_plan,
    paged_decode_attention,
    paged_decode_attention_reference,
    processor_count,
)

#: heads, kv heads, head width of each shape's attention
SHAPES = {"llama-3.2-1b": (32, 8, 64), "llama-3-8b": (32, 8, 128), "tiny": (4, 2, 16)}
#: (rows, context) cases of the full run and of ``--quick``
CASES = ((32, 128), (32, 1024), (32, 4096), (4, 4096), (128, 1024))
QUICK_CASES = ((3, 40), (2, 100))
BLOCK_SIZE = 16


def sweep(auto: LaunchPlan) -> list[LaunchPlan]:
    """The chosen plan's neighbours: every split count with its tile and warps, its split
    count with narrower and wider tiles and the other warp count, and one split with
    one-block tiles (the kernel's first form)."""
    plans = [LaunchPlan(s, auto.tile, auto.num_warps) for s in (1, 2, 4, 8, 16)]
    plans += [LaunchPlan(auto.splits, tile, auto.num_warps) for tile in (16, 64)]
    plans.append(LaunchPlan(auto.splits, auto.tile, 12 - auto.num_warps))
    plans.append(LaunchPlan(1, BLOCK_SIZE, 4))
    unique: list[LaunchPlan] = []
    for plan in plans:
        if plan not in unique:
            unique.append(plan)
    return unique


def make_inputs(
    shape: tuple[int, int, int], rows: int, context: int, width_positions: int, device: str,
    dtype: torch.dtype, seed: int,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Query, key and value blocks, tables and lengths; each row's blocks shuffled. Drawn on
    ``device`` (the largest cases hold half a gigabyte of KV)."""
    heads, kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    per_row = -(-context // BLOCK_SIZE)
    width = max(per_row, -(-width_positions // BLOCK_SIZE))
    num_blocks = rows * per_row + 1
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros((rows, width), dtype=torch.int64)
    tables[:, :per_row] = order[: rows * per_row].view(rows, per_row)
    dims = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    draw = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(dims, generator=draw, device=device, dtype=dtype)
    v = torch.randn(dims, generator=draw, device=device, dtype=dtype)
    q = torch.randn((rows, heads, head_dim), generator=draw, device=device, dtype=dtype)
    lens = torch.full((rows,), context, dtype=torch.int64, device=device)
    return q, k, v, tables.to(device), lens


def time_call(call: Callable[[], Any], device: str, repeats: int) -> float:
    """Median seconds of one call, after two warm-up calls (compilation included there)."""
    for _ in range(2):
        call()
    sync_device(torch.device(device))
    seconds = []
    for _ in range(repeats):
        begin = time.perf_counter()
        call()
        sync_device(torch.device(device))
        seconds.append(time.perf_counter() - begin)
    return statistics.median(seconds)


def run_case(
    shape: tuple[int, int, int], rows: int, context: int, opts: argparse.Namespace,
    bandwidth: float,
) -> dict[str, Any]:  # fmt: skip
    dtype = getattr(torch, opts.dtype)
    q, k, v, tables, lens = make_inputs(
        shape, rows, context, opts.table_positions, opts.device, dtype, opts.seed
    )
    scale = shape[2] ** -0.5
    want = paged_decode_attention_reference(q.float(), k.float(), v.float(), tables, lens, scale)
    kv_bytes = 2 * rows * context * shape[1] * shape[2] * k.element_size()
    reference_s = time_call(
        lambda: paged_decode_attention_reference(q, k, v, tables, lens, scale),
        opts.device,
        opts.repeats,
    )
    processors = processor_count(torch.device(opts.device))
    auto = launch_plan(rows, *shape, tables.shape[1] * BLOCK_SIZE, processors)
    results = []
    for plan in [auto, LaunchPlan(1, BLOCK_SIZE, 4)] if opts.quick else sweep(auto):
        got = paged_decode_attention(q, k, v, tables, lens, scale, plan=plan)
        call = functools.partial(paged_decode_attention, q, k, v, tables, lens, scale, plan=plan)
        seconds = time_call(call, opts.device, opts.repeats)
        results.append({
            "splits": plan.splits, "tile": plan.tile, "num_warps": plan.num_warps,
            "ms": round(seconds * 1e3, 4),
            "kv_gb_s": round(kv_bytes / seconds / 1e9, 1),
            "vs_bandwidth": round(kv_bytes / seconds / bandwidth, 3),
            "max_error": float((got.float() - want).abs().max()),
            "auto": plan == auto,
        })  # fmt: skip
    best = min(results, key=lambda r: r["ms"])
    chosen = next(r for r in results if r["auto"])
    first_form = results[-1]
    return {
        "rows": rows,
        "context": context,
        "kv_bytes": kv_bytes,
        "reference_ms": round(reference_s * 1e3, 4),
        "plans": results,
        "best": {key: best[key] for key in ("splits", "tile", "num_warps", "ms")},
        "auto_vs_best": round(chosen["ms"] / best["ms"], 3),
        "auto_speedup_vs_one_split": round(first_form["ms"] / chosen["ms"], 3),
        "auto_speedup_vs_reference": round(reference_s * 1e3 / chosen["ms"], 3),
    }


def run(opts: argparse.Namespace, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Every case of every shape in ``opts``; ``progress`` gets the result so far after each."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not available(opts.device) and not interpreted:
        raise SystemExit(
            f"no paged decode kernel on {opts.device}: it needs CUDA and triton "
            "(or TRITON_INTERPRET=1 on the CPU, for a check of the plumbing)"
        )
    bandwidth = copy_bandwidth(opts.device)
    out: dict[str, Any] = {
        "bench": "decode-kernel",
        "device": torch.cuda.get_device_name() if opts.device == "cuda" else "cpu",
        "dtype": opts.dtype,
        "interpreted": interpreted,
        "bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "block_size": BLOCK_SIZE,
        "table_positions": opts.table_positions,
        "shapes": {},
    }
    begin = time.perf_counter()
    for name in opts.shapes.split(","):
        cases = []
        for rows, context in QUICK_CASES if opts.quick else CASES:
            case = run_case(SHAPES[name], rows, context, opts, bandwidth)
            print(f"[decode-kernel] {name} {rows}x{context}: {_brief(case)}", flush=True)
            cases.append(case)
            out["shapes"][name] = cases
            progress(out)
    out["seconds"] = round(time.perf_counter() - begin, 1)
    return out


def _brief(case: dict[str, Any]) -> str:
    chosen = next(r for r in case["plans"] if r["auto"])
    return (
        f"auto {chosen['ms']} ms ({chosen['vs_bandwidth']} of bandwidth), best {case['best']}, "
        f"one split x{case['auto_speedup_vs_one_split']}, "
        f"reference x{case['auto_speedup_vs_reference']}"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b", help="comma-separated")
    parser.add_argument("--table-positions", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="small cases (the CPU check)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vajra bench decode-kernel", description=__doc__)
    add_arguments(parser)
    opts = parser.parse_args(argv)
    if opts.shapes and any(name not in SHAPES for name in opts.shapes.split(",")):
        parser.error(f"--shapes: choose among {', '.join(SHAPES)}")
    result = run(opts, partial_writer(opts.json))
    write_result(opts.json, result)
    print(f"[decode-kernel] written to {opts.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
