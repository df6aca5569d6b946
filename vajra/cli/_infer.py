"""``vajra infer``: send one generation request through the gateway and print the text."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING, Any

from vajra.cli._common import api_key, gateway_address, load_args_config, with_config

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands
    from vajra.client import Usage


def register(sub: Subcommands) -> None:
    infer = with_config(sub.add_parser("infer", help="send one request through the gateway"))
    infer.add_argument("prompt", help="the text to continue")
    infer.add_argument("--key", help="API key (default: $VAJRA_API_KEY)")
    infer.add_argument(
        "--adapter",
        metavar="NAME[@VERSION]",
        help="one of your adapters, its active version unless @VERSION (default: none, the "
        "base model)",
    )
    infer.add_argument(
        "--gateway",
        metavar="ADDRESS",
        help="gateway address, e.g. tcp://127.0.0.1:5555 (default: the running cluster's, "
        "from $VAJRA_HOME/cluster.json)",
    )
    infer.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        metavar="N",
        help="most tokens to generate (default: %(default)s)",
    )
    infer.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="sampling temperature, 0: greedy (default: %(default)s)",
    )
    infer.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="nucleus sampling: keep the likeliest tokens up to this probability mass "
        "(default: %(default)s, all)",
    )
    infer.add_argument(
        "--stop",
        action="append",
        metavar="TEXT",
        help="end the generation where TEXT appears; repeat for several (default: none)",
    )
    infer.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="sampling seed, for repeatable samples (default: none)",
    )
    infer.add_argument(
        "--stream", action="store_true", help="print the text as it is generated (default: off)"
    )
    infer.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up after this long (default: %(default)s)",
    )
    infer.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print the token and GPU-time usage to stderr (default: off)",
    )
    infer.set_defaults(func=cmd_infer)


def cmd_infer(args: argparse.Namespace) -> int:
    from vajra.client import Client

    cfg = load_args_config(args)
    with Client(gateway_address(cfg, args), api_key(args), timeout_s=args.timeout) as client:
        kw: dict[str, Any] = dict(
            adapter=args.adapter,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop=args.stop or None,
            seed=args.seed,
        )
        usage: Usage | None = None
        if args.stream:
            for chunk in client.stream(args.prompt, **kw):
                print(chunk.text, end="", flush=True)
                usage = chunk.usage or usage
            print()
        else:
            result = client.infer(args.prompt, **kw)
            print(result.text)
            usage = result.usage
        if args.verbose and usage is not None:
            print(json.dumps(dataclasses.asdict(usage)), file=sys.stderr)
    return 0
