"""``vajra bench train``'s options (kept apart from the benchmark so the CLI imports no torch)."""

from __future__ import annotations

import argparse


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument(
        "--shape",
        default="tiny",
        choices=["tiny", "small", "llama-3.2-1b"],
        help="the built random model (llama-3.2-1b: for a GPU)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA if present)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--requests", type=int, default=8, help="inference requests per run")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--max-micro-tokens", type=int, default=256)
    parser.add_argument("--inference-ratio", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a short run that checks it works")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="also measure TTFT/ITL through a real cluster (vajra up) with no job, a job with "
        "preemption on, and off (vajra/bench/train_cluster.py); adds 'cluster' to the JSON",
    )
    parser.add_argument("--cluster-requests", type=int, default=128, help="streams per run")
    parser.add_argument("--cluster-concurrency", type=int, default=4, help="streams at once")
