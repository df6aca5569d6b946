"""``vajra model init-tiny`` (a small model directory) and ``vajra bench`` (benchmarks that
write JSON results)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from vajra.bench.engine_args import add_engine_arguments

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
    engine = bsub.add_parser(
        "engine",
        help="the engine alone: tokens/s, ITL and TTFT on Azure trace requests, context length, "
        "prefill interference, KV memory, prefix cache, vs transformers and the old engine",
    )
    add_engine_arguments(engine)
    engine.set_defaults(func=cmd_bench_engine)
    # `vajra bench adapters ARGS` hands ARGS to the benchmark's own parser (see vajra.cli.main).
    bsub.add_parser(
        "adapters",
        help="adapter activation latency per tier and multi-adapter decode throughput vs PEFT "
        "(options: vajra bench adapters --help)",
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


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from vajra.bench.engine import run_from_args

    return run_from_args(args)
