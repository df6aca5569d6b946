"""``vajra model init-tiny`` (a small model directory) and ``vajra bench`` (benchmarks that
write JSON results)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vajra.bench.engine_args import add_engine_arguments
from vajra.bench.train_args import add_train_arguments

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands


def register(sub: Subcommands) -> None:
    model = sub.add_parser("model", help="model directories")
    msub = model.add_subparsers(dest="model_cmd", required=True)
    tiny = msub.add_parser(
        "init-tiny", help="write a small random-weight Llama model and tokenizer"
    )
    tiny.add_argument("dir", help="where to write it (created if needed)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default: %(default)s)")
    tiny.set_defaults(func=cmd_model_init_tiny)

    bench = sub.add_parser("bench", help="benchmarks writing JSON results")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    bus = bsub.add_parser("bus", help="end-to-end request rate and latency with a null model")
    bus.add_argument("--json", required=True, help="where to write the results")
    bus.add_argument(
        "--duration",
        type=float,
        default=5.0,
        help="seconds per throughput run (default: %(default)s)",
    )
    bus.add_argument(
        "--concurrency",
        type=int,
        default=256,
        help="requests kept outstanding (default: %(default)s)",
    )
    bus.add_argument(
        "--latency-requests",
        type=int,
        default=2000,
        help="sequential requests for p50/p99 (default: %(default)s)",
    )
    bus.set_defaults(func=cmd_bench_bus)
    serving = bsub.add_parser(
        "serving",
        help="tokens/s of 32 concurrent generations through the SDK vs a static transformers "
        "batch, and the engine alone, on the tiny model",
    )
    serving.add_argument("--json", required=True, help="where to write the results")
    serving.add_argument(
        "--quick", action="store_true", help="a short run that checks it works (16 tokens, 1 round)"
    )
    serving.set_defaults(func=cmd_bench_serving)
    paced = bsub.add_parser(
        "paced",
        help="the serving path's first-token latency and CPU per request, one request at a "
        "time with idle gaps, vs back to back and the engine alone, on the tiny model",
    )
    paced.add_argument("--json", required=True, help="where to write the results")
    paced.add_argument(
        "--requests", type=int, default=200, help="measured requests (default: %(default)s)"
    )
    paced.add_argument(
        "--gap-ms",
        type=float,
        default=43.0,
        help="idle ms between one request's end and the next (default: %(default)s)",
    )
    paced.add_argument(
        "--max-tokens", type=int, default=8, help="new tokens per request (default: %(default)s)"
    )
    paced.add_argument(
        "--prompt-tokens", type=int, default=64, help="prompt words (default: %(default)s)"
    )
    paced.add_argument(
        "--adapters", type=int, default=50, help="adapters, used in turn (default: %(default)s)"
    )
    paced.add_argument(
        "--quick",
        action="store_true",
        help="a short run that checks it works (20 requests, 4 adapters, 1 round)",
    )
    paced.set_defaults(func=cmd_bench_paced)
    engine = bsub.add_parser(
        "engine",
        help="the engine alone: tokens/s, ITL and TTFT on Azure trace requests, context length, "
        "prefill interference, KV memory, prefix cache, vs transformers and the old engine",
    )
    add_engine_arguments(engine)
    engine.set_defaults(func=cmd_bench_engine)
    placement = bsub.add_parser(
        "placement",
        help="placement decision time (Algorithm 2's index) at 10 to 10,000 executors",
    )
    placement.add_argument("--json", required=True, help="where to write the results")
    placement.add_argument(
        "--decisions", type=int, default=20_000, help="per size (default: %(default)s)"
    )
    placement.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    placement.add_argument(
        "--sizes",
        default="10,100,1000,10000",
        help="executor counts, comma-separated (default: %(default)s)",
    )
    placement.set_defaults(func=cmd_bench_placement)
    train = bsub.add_parser(
        "train",
        help="LoRA training tokens/s vs PEFT, and inference TTFT/ITL with a job running, "
        "preemption on and off",
    )
    add_train_arguments(train)
    train.set_defaults(func=cmd_bench_train)
    # `vajra bench adapters ARGS` hands ARGS to the benchmark's own parser (see vajra.cli.main).
    bsub.add_parser(
        "adapters",
        help="adapter activation latency per tier and multi-adapter decode throughput vs PEFT "
        "(options: vajra bench adapters --help)",
    )
    bsub.add_parser(
        "decode-kernel",
        help="the paged decode attention kernel alone, by launch plan, against the torch path "
        "(options: vajra bench decode-kernel --help)",
    )


def cmd_model_init_tiny(args: argparse.Namespace) -> int:
    from vajra.gpu.tiny import init_tiny_model

    path = init_tiny_model(Path(args.dir), seed=args.seed)
    print(f"tiny model written to {path}")
    return 0


def cmd_bench_bus(args: argparse.Namespace) -> int:
    from vajra.bench.bus import run_bus_bench

    result = run_bus_bench(
        duration_s=args.duration,
        concurrency=args.concurrency,
        latency_requests=args.latency_requests,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def cmd_bench_serving(args: argparse.Namespace) -> int:
    from vajra.bench.serving import run_serving_bench

    result = run_serving_bench(quick=args.quick)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def cmd_bench_paced(args: argparse.Namespace) -> int:
    from vajra.bench.serving_paced import run_paced_bench

    try:
        result = run_paced_bench(
            requests=args.requests,
            gap_ms=args.gap_ms,
            max_tokens=args.max_tokens,
            prompt_tokens=args.prompt_tokens,
            adapters=args.adapters,
            quick=args.quick,
        )
    except ValueError as exc:
        print(f"vajra bench paced: {exc}", file=sys.stderr)
        return 2
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def cmd_bench_placement(args: argparse.Namespace) -> int:
    from vajra.bench.placement import run_placement_bench

    try:
        sizes = tuple(int(x) for x in args.sizes.split(","))
        result = run_placement_bench(sizes=sizes, decisions=args.decisions, seed=args.seed)
    except ValueError as exc:
        print(f"vajra bench placement: {exc}", file=sys.stderr)
        return 2
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from vajra.bench.train import run_from_args

    return run_from_args(args)


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from vajra.bench.engine import run_from_args

    return run_from_args(args)
