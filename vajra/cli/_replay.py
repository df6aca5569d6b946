"""``vajra replay TRACE``: drive a running cluster with a recorded or bundled trace.

The trace is loaded (``--format``), cut to its first ``--duration`` seconds, its sources
mapped onto ``--adapters`` adapters (``--mapping``; a trace with one source, like the Azure LLM
ones, is spread S-LoRA's way), those adapters made sure of (random PEFT adapters for the
cluster's base model, pushed under the key's tenant; existing ones of the same name reused),
then replayed open-loop ``--speed`` times faster (:mod:`vajra.traces.replay`). Cold starts are
read from each executor's metrics endpoint (``--metrics URL``, or the running cluster's
``cluster.metrics_port``). ``TRACE`` may name a bundled sample (``vajra.traces.bundled``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vajra.cli._common import (
    api_key,
    cluster_config,
    gateway_address,
    load_args_config,
    with_config,
)

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands
    from vajra.client import AsyncClient
    from vajra.config import VajraConfig
    from vajra.traces import MappingMode, Trace


def register(sub: Subcommands) -> None:
    from vajra.traces import FORMATS

    rp = with_config(sub.add_parser("replay", help="replay a request trace against the cluster"))
    rp.add_argument("trace", help="trace file or directory, or a bundled sample's name")
    rp.add_argument("--format", required=True, choices=FORMATS, help="the trace's format")
    rp.add_argument("--key", help="API key; adapters go to its tenant (default: $VAJRA_API_KEY)")
    rp.add_argument("--gateway", metavar="ADDRESS", help="gateway address (default: running)")
    rp.add_argument("--speed", type=float, default=1.0, metavar="X", help="time compression")
    rp.add_argument(
        "--adapters",
        type=int,
        default=None,
        metavar="N",
        help="adapters to spread the trace over (default: one per source, at most 100)",
    )
    rp.add_argument(
        "--mapping",
        choices=("striped", "one-to-one", "power-law"),
        default=None,
        help="source -> adapter mapping (default: striped; power-law for one source)",
    )
    rp.add_argument("--alpha", type=float, default=1.0, help="power-law mapping's alpha")
    rp.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="S",
        help="replay only the first S seconds of trace time (before --speed)",
    )
    rp.add_argument(
        "--prompt-tokens",
        type=int,
        default=64,
        metavar="N",
        help="prompt tokens of traces that carry none (Azure Functions); default 64",
    )
    rp.add_argument(
        "--output-tokens",
        type=int,
        default=8,
        metavar="N",
        help="output tokens of traces that carry none (Azure Functions); default 8",
    )
    rp.add_argument(
        "--rate",
        type=float,
        default=1.0,
        metavar="R",
        help="keep each arrival with probability R (< 1) or copy it (> 1); default 1",
    )
    rp.add_argument(
        "--start", type=float, default=0.0, metavar="S", help="skip the trace's first S seconds"
    )
    rp.add_argument(
        "--max-inflight",
        type=int,
        default=256,
        metavar="N",
        help="requests outstanding at most; more are shed and counted",
    )
    rp.add_argument("--max-prompt-tokens", type=int, default=128, metavar="N")
    rp.add_argument(
        "--max-tokens",
        type=int,
        default=16,
        metavar="N",
        help="cap on each request's output tokens",
    )
    rp.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per request")
    rp.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="URL",
        help="an executor's /metrics URL (repeat; default: from cluster.metrics_port)",
    )
    rp.add_argument(
        "--model",
        metavar="DIR",
        help="base model directory the adapters are "
        "built for (default: the cluster's cluster.model)",
    )
    rp.add_argument("--prefix", default="replay", help="adapter name prefix (default: replay)")
    rp.add_argument("--seed", type=int, default=0, help="seed of the trace's random choices")
    rp.add_argument("--json", metavar="PATH", help="write every figure as JSON here")
    rp.add_argument("--no-progress", action="store_true", help="no progress bar")
    rp.set_defaults(func=cmd_replay)


def load_for_replay(args: argparse.Namespace) -> Trace:
    """The trace of ``args``: loaded, cut, and mapped onto adapter indices."""
    from vajra.traces import TraceError, bundled, load_trace, map_to_adapters

    path = Path(args.trace)
    if not path.exists():
        try:
            path = bundled(args.trace)
        except TraceError:
            raise TraceError(f"no such trace file or bundled sample: {args.trace}") from None
    opts: dict[str, Any] = {}
    if args.format.startswith("azure-functions"):
        opts.update(
            seed=args.seed, prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens
        )
    trace = load_trace(path, args.format, **opts)
    if args.start or args.duration is not None:
        end = float("inf") if args.duration is None else (args.start + args.duration) * 1000.0
        trace = trace.slice(args.start * 1000.0, end)
    if not len(trace):
        raise TraceError("the trace has no arrivals in the chosen window", column="duration")
    trace = trace.rebased()
    active = int((trace.counts_by_source() > 0).sum())
    n = args.adapters if args.adapters is not None else min(active, 100)
    mode: MappingMode = args.mapping or ("power-law" if len(trace.sources) == 1 else "striped")
    trace = map_to_adapters(trace, n, mode=mode, alpha=args.alpha, seed=args.seed)
    # rate last, as the simulator's workload does, so both thin the same mapped trace alike
    if args.rate != 1.0:
        trace = trace.scaled(rate=args.rate, seed=args.seed)
    if not len(trace):
        raise TraceError("no arrivals are left after --rate", column="rate")
    return trace


async def _metrics_urls(client: AsyncClient, cfg: VajraConfig, given: list[str]) -> list[str]:
    if given:
        return given
    from vajra.actors.actor_processes import EXECUTOR_PORT_OFFSET

    base = cfg.cluster.metrics_port
    if base <= 0:
        return []
    urls = []
    for ex in await client.cluster_status():
        index = ex.executor_id.removeprefix("exec-")
        if index.isdigit():
            urls.append(f"http://127.0.0.1:{base + EXECUTOR_PORT_OFFSET + int(index)}/metrics")
    return urls


async def _run(
    args: argparse.Namespace, trace: Trace, cfg: VajraConfig, model: Path
) -> dict[str, Any]:
    import trio

    from vajra.adapters.format import base_model_spec
    from vajra.client import AsyncClient
    from vajra.policies.billing import Prices
    from vajra.traces._replay_support import register_adapters
    from vajra.traces.replay import ReplayOptions, replay

    options = ReplayOptions(
        speed=args.speed,
        max_inflight=args.max_inflight,
        max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_tokens,
        timeout_s=args.timeout,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    options.check()
    address = gateway_address(cfg, args)
    async with AsyncClient(address, api_key(args), timeout_s=max(60.0, args.timeout)) as client:
        await client.ping()
        spec = await trio.to_thread.run_sync(base_model_spec, model)
        names, pushed = await register_adapters(
            client, spec, len(trace.sources), prefix=args.prefix, seed=args.seed
        )
        print(f"adapters: {len(names)} ({pushed} pushed now)", file=sys.stderr)
        urls = await _metrics_urls(client, cfg, args.metrics)
        report = await replay(
            client, trace, names, options, metrics_urls=urls, prices=Prices.of(cfg.policies)
        )
    report["adapters_pushed"] = pushed
    report["format"] = args.format
    # what was replayed, so a simulation can load exactly the same arrivals
    report["selection"] = {
        k: getattr(args, k)
        for k in (
            "trace",
            "format",
            "adapters",
            "mapping",
            "alpha",
            "start",
            "duration",
            "rate",
            "seed",
        )
    }
    report["selection"]["adapters"] = len(trace.sources)
    return report


def cmd_replay(args: argparse.Namespace) -> int:
    import trio

    from vajra.traces import TraceError

    cfg = cluster_config(load_args_config(args), args)
    model = args.model or cfg.cluster.model
    if not model or not Path(model).is_dir():
        raise TraceError(
            f"adapters need the base model's directory (--model, or cluster.model): {model!r}",
            column="model",
        )
    trace = load_for_replay(args)
    print(f"{trace!r}: replaying at {args.speed}x", file=sys.stderr)
    report = trio.run(_run, args, trace, cfg, Path(model))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    ttft, e2e, cold = report["ttft_ms"], report["e2e_ms"], report["cold_starts"]
    print(
        f"sent {report['sent']}/{report['arrivals']}, completed {report['completed']}, "
        f"errors {report['errors'] or 'none'}\n"
        f"TTFT ms p50 {ttft['p50']} p99 {ttft['p99']}; end-to-end ms p50 {e2e['p50']} "
        f"p99 {e2e['p99']}\n"
        f"cold starts: {cold.get('cold', '?')} of {cold.get('cold', 0) + cold.get('warm', 0)} "
        f"({cold['source']})\n"
        f"billed {report['billing']['billed_ms']} ms, ${report['billing']['cost_usd']:.6f}"
    )
    return 0
