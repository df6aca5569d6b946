"""``vajra bench adapters``: adapter activation latency and multi-adapter decode throughput.

(a) **Activation**: the time to bring one adapter of a given shape into a pool slot, per tier.
    Built in: ``pinned`` (an adapter already packed in (pinned) host memory: one copy) and
    ``page_cache`` (a PEFT ``adapter_model.safetensors`` file just written, so in the OS page
    cache: read, validate, pack, copy). Other tiers (disk, object store) plug in through
    ``tiers=``: a :data:`TierFactory` receives the adapter's files and returns a loader that
    fetches it from that tier and returns a :class:`~vajra.gpu.lora.HostAdapter`.
(b) **Decode throughput** with 1, 8, 32, 128, 512 distinct adapters in the batch, against the
    same model base-only and against PEFT's mixed-batch inference (``generate(...,
    adapter_names=[...])`` on a ``PeftModel`` holding every adapter), all on one model in one
    run. All three run through ``transformers``' ``generate`` (greedy, a fixed number of new
    tokens), so only the LoRA path differs. A batch has ``max(batch_size, adapters)`` rows, row
    ``i`` using adapter ``i % adapters``; base-only is measured at each row count too.

(a) is measured by :mod:`vajra.bench.adapter_activation`, (b) by
:mod:`vajra.bench.adapter_throughput`, on the shapes of :mod:`vajra.bench.lora_models`; this
module runs both and is the command line. Dependency-light on purpose: torch, transformers, peft and safetensors only (no trio, zmq or
redis), so ``python -m vajra.bench.adapters --json out.json`` runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vajra.bench.adapter_activation import TierFactory, measure_activation
from vajra.bench.adapter_throughput import measure_throughput
from vajra.bench.lora_models import SHAPES
from vajra.bench.result_file import Progress, partial_writer, write_result


def run_adapters_bench(
    *,
    device: str | None = None,
    model_shape: str | None = None,
    counts: Sequence[int] = (1, 8, 32, 128, 512),
    batch_size: int | None = None,
    new_tokens: int | None = None,
    rank: int = 16,
    peft: bool = True,
    peft_max_adapters: int | None = None,
    modes: Sequence[str] = ("auto",),
    activation_shape: str | None = None,
    activation_repeats: int | None = None,
    repeats: int | None = None,
    tiers: Mapping[str, TierFactory] | None = None,
    log: Callable[[str], None] = lambda _: None,
    partial: Progress = lambda _: None,
) -> dict[str, Any]:
    """Run (a) and (b). Defaults on CUDA: a Llama-3.2-1B-shaped random model in bfloat16, batch
    32, 64 new tokens, best of 3, activation of a Llama-3-8B-shaped adapter. On the CPU (to
    finish in a few minutes on 2 cores): the "tiny" shape in float32, batch 32, 8 new tokens,
    one timed run after a warm-up, activation of a "tiny"-shaped adapter. ``partial`` gets the
    result so far after (a) and after each adapter count of (b)."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = target.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = model_shape or ("llama-3.2-1b" if cuda else "tiny")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(target) if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    started = time.perf_counter()
    result["activation"] = measure_activation(
        shape=activation_shape or ("llama-3-8b" if cuda else shape),
        rank=rank,
        device=target,
        dtype=dtype,
        tiers=tiers,
        repeats=activation_repeats or (20 if cuda else 10),
    )
    log(f"activation: {result['activation']}")
    partial(result)
    result["throughput"] = measure_throughput(
        shape=shape,
        device=target,
        dtype=dtype,
        counts=counts,
        batch_size=batch_size or 32,
        new_tokens=new_tokens or (64 if cuda else 8),
        repeats=repeats or (3 if cuda else 1),
        rank=rank,
        peft=peft,
        peft_max_adapters=peft_max_adapters,
        modes=modes,
        log=log,
        progress=lambda throughput: partial({**result, "throughput": throughput}),
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vajra.bench.adapters", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--device", default=None)
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--counts", default="1,8,32,128,512")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument(
        "--peft-max-adapters",
        type=int,
        default=None,
        help="compare with PEFT only at counts up to this (PEFT loads adapters one by one)",
    )
    parser.add_argument(
        "--kernels", action="store_true", help="also time the gather and segmented paths alone"
    )
    parser.add_argument("--activation-shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--activation-repeats", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (best is kept)")
    args = parser.parse_args(argv)
    result = run_adapters_bench(
        device=args.device,
        model_shape=args.model_shape,
        counts=[int(c) for c in args.counts.split(",")],
        batch_size=args.batch_size,
        new_tokens=args.new_tokens,
        rank=args.rank,
        peft=not args.no_peft,
        peft_max_adapters=args.peft_max_adapters,
        modes=("auto", "gather", "segmented") if args.kernels else ("auto",),
        activation_shape=args.activation_shape,
        activation_repeats=args.activation_repeats,
        repeats=args.repeats,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        partial=partial_writer(args.json),
    )
    if args.json:
        write_result(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
