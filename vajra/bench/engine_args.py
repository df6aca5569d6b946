"""The options of ``vajra bench engine`` and the settings they make (no torch import here, so
the command line stays quick to start).

:class:`EngineBenchConfig` holds every knob; :meth:`EngineBenchConfig.full` and
:meth:`EngineBenchConfig.quick` are the two presets, and the command-line options override them.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineBenchConfig:
    """What the engine benchmark runs; the sections are named as in :mod:`vajra.bench.engine`."""

    model_dir: Path | None = None  # None: build the bench model (see engine_model)
    model_shape: str = "tiny"  # shape of the built model: a vajra.bench.lora_models shape
    device: str | None = None
    dtype: str | None = None  # None: float32 on the CPU, bfloat16 on CUDA
    # (a) concurrency levels, and requests per level (the first N of the merged trace)
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    requests_per_level: tuple[int, ...] = (32, 128, 256, 512)
    max_prompt_tokens: int = 1500  # trace prompt lengths are capped here
    max_output_tokens: int = 128  # trace output lengths are capped here
    prompt_scale: float = 1.0  # trace prompt lengths are multiplied by this before the cap
    rate_scale: float = 100.0  # arrivals come this many times faster than in the trace
    level_time_limit_s: float = 240.0  # a level still running then is cut short (and says so)
    # (b) decode step time against context length
    contexts: tuple[int, ...] = (128, 512, 1024, 2048, 4096)
    context_rows: int = 8
    context_steps: int = 16
    # (c) a long prefill arriving while streams decode
    streams: int = 32
    stream_prompt_tokens: int = 128
    long_prompt_tokens: int = 2000
    interference_steps: int = 16  # decode steps measured before each long prompt
    interference_repeats: int = 3
    # (e) shared system prompt
    prefix_requests: int = 32
    system_prompt_tokens: int = 500
    prefix_output_tokens: int = 16
    # (f) comparison at one concurrency; transformers' continuous batching is cut off after
    compare_concurrency: int = 32
    cb_time_limit_s: float = 180.0
    # (g) distinct adapters (each with its own concurrency level = adapter count)
    adapter_counts: tuple[int, ...] = (32, 128)
    adapter_ranks: tuple[int, ...] = (8, 16, 32, 64)
    adapter_pairs: int = 1  # timed (base-only, adapters) pairs per count, alternating
    # engine settings passed only where load_engine takes them (the paged-KV engine)
    max_batch_tokens: int = 2048
    decode_graphs: str = "auto"  # vajra.gpu.decode_graphs: auto | eager | off
    kv_cache_bytes: int | None = None  # None: enough for each run's rows at full length
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    seed: int = 0
    quick: bool = False

    @classmethod
    def full(cls) -> EngineBenchConfig:
        return cls()

    @classmethod
    def quick_preset(cls) -> EngineBenchConfig:
        """A short form that checks everything runs: small prompts and outputs, few requests."""
        return cls(
            concurrency=(1, 8, 32, 128),
            requests_per_level=(2, 8, 32, 128),
            max_prompt_tokens=64,
            max_output_tokens=8,
            rate_scale=1000.0,
            level_time_limit_s=600.0,
            contexts=(128, 512),
            context_rows=4,
            context_steps=4,
            streams=8,
            stream_prompt_tokens=32,
            long_prompt_tokens=256,
            interference_steps=4,
            interference_repeats=1,
            prefix_requests=8,
            system_prompt_tokens=128,
            prefix_output_tokens=4,
            compare_concurrency=8,
            cb_time_limit_s=30.0,
            adapter_counts=(8, 16),
            max_batch_tokens=512,
            threads=1,  # a functional check: keep it quick on a busy machine
            quick=True,
        )


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``vajra bench engine`` (also ``python -m vajra.bench.engine``)."""
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a Hugging Face model directory (default: build a random model, --model-shape)",
    )
    parser.add_argument(
        "--model-shape",
        choices=("tiny", "small", "llama-3.2-1b", "llama-3-8b"),
        default="tiny",
        help="the shape of the built random model (default: %(default)s; vajra.bench.lora_models "
        "shapes, with the tiny model's tokenizer and vocabulary)",
    )
    parser.add_argument("--quick", action="store_true", help="a short form (well under a minute)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 (bfloat16 on CUDA)")
    parser.add_argument("--concurrency", default=None, help="levels for (a), e.g. 1,8,32,128")
    parser.add_argument(
        "--requests", default=None, help="requests per level for (a), e.g. 32,128,256,512"
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=None, help="cap on trace prompt lengths (1500)"
    )
    parser.add_argument(
        "--max-output-tokens", type=int, default=None, help="cap on trace output lengths (128)"
    )
    parser.add_argument(
        "--rate-scale", type=float, default=None, help="arrivals this many times the trace's (100)"
    )
    parser.add_argument("--contexts", default=None, help="context lengths for (b)")
    parser.add_argument("--context-rows", type=int, default=None, help="rows decoding in (b)")
    parser.add_argument("--adapter-counts", default=None, help="adapter counts for (g)")
    parser.add_argument(
        "--adapter-pairs",
        type=int,
        default=None,
        help="timed pairs of runs per count for (g), base-only then adapters, alternating; "
        "the medians are reported (1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on the CPU (default: torch's own); 1 keeps a shared machine's "
        "other work from stalling every step",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="tokens per step, for an engine that takes it (2048)",
    )
    parser.add_argument(
        "--decode-graphs",
        choices=("auto", "eager", "off"),
        default=None,
        help="CUDA graphs of decode steps (auto: on CUDA; eager: their static path uncaptured, "
        "e.g. to exercise it on the CPU; off)",
    )
    parser.add_argument(
        "--kv-cache-mb",
        type=float,
        default=None,
        help="KV cache size, for an engine that takes it (default: each run's rows at full "
        "length plus a quarter)",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="sections to leave out, e.g. f,g (their entries are null in the JSON)",
    )


def config_from_args(args: argparse.Namespace) -> EngineBenchConfig:
    base = EngineBenchConfig.quick_preset() if args.quick else EngineBenchConfig.full()
    ints = _int_tuple
    changes: dict[str, object] = {"model_dir": args.model, "model_shape": args.model_shape}
    for name, value in (
        ("device", args.device),
        ("dtype", args.dtype),
        ("concurrency", ints(args.concurrency)),
        ("requests_per_level", ints(args.requests)),
        ("max_prompt_tokens", args.max_prompt_tokens),
        ("max_output_tokens", args.max_output_tokens),
        ("rate_scale", args.rate_scale),
        ("contexts", ints(args.contexts)),
        ("context_rows", args.context_rows),
        ("adapter_counts", ints(args.adapter_counts)),
        ("adapter_pairs", args.adapter_pairs),
        ("max_batch_tokens", args.max_batch_tokens),
        ("decode_graphs", args.decode_graphs),
        ("threads", args.threads),
    ):
        if value is not None:
            changes[name] = value
    if args.kv_cache_mb is not None:
        changes["kv_cache_bytes"] = int(args.kv_cache_mb * 2**20)
    config = dataclasses.replace(base, **changes)  # type: ignore[arg-type]
    if len(config.requests_per_level) != len(config.concurrency):
        raise SystemExit("--requests needs one count per --concurrency level")
    return config


def skipped_sections(args: argparse.Namespace) -> frozenset[str]:
    return frozenset(s.strip() for s in args.skip.split(",") if s.strip())


def _int_tuple(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(x) for x in text.split(",") if x.strip())
