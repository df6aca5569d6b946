"""``vajra model init-tiny`` (a small model directory) and ``vajra bench`` (benchmarks that
write JSON results)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

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
