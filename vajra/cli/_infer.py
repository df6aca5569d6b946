"""``vajra infer``: send one generation request through the gateway and print the text.

``--n N`` prints each choice under a ``--- choice I ---`` line; ``--logprobs K`` prints,
after each choice's text, one line per token: its logprob, the token, and its ``K``
likeliest alternatives; ``--json-schema FILE`` / ``--response-format json_object``
constrain the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vajra.cli._common import api_key, gateway_address, load_args_config, with_config

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands
    from vajra.client import TokenLogprob, Usage


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
        "--n",
        type=int,
        default=1,
        metavar="N",
        help="how many choices to generate, sent together (default: %(default)s)",
    )
    infer.add_argument(
        "--logprobs",
        type=int,
        metavar="K",
        help="print each token's logprob and its K likeliest alternatives, 0..20 (default: none)",
    )
    shape = infer.add_mutually_exclusive_group()
    shape.add_argument(
        "--json-schema",
        type=Path,
        metavar="FILE",
        help="constrain the output to the JSON schema in FILE (default: none)",
    )
    shape.add_argument(
        "--response-format",
        choices=("text", "json_object"),
        help="json_object: the output is one JSON object (default: text)",
    )
    infer.add_argument(
        "--stream",
        action="store_true",
        help="print the text as it is generated, one choice only (default: off)",
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


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.json_schema is not None:
        try:
            schema = json.loads(args.json_schema.read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"vajra: --json-schema {args.json_schema}: {exc}") from None
        return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    if args.response_format is not None:
        return {"type": args.response_format}
    return None


def _print_logprobs(entries: list[TokenLogprob]) -> None:
    for e in entries:
        others = ", ".join(f"{t!r} {lp:.4f}" for _, t, lp in e.top if t != e.token)
        lp = "-" if e.logprob is None else f"{e.logprob:.4f}"
        print(f"{lp:>10}  {e.token!r}" + (f"  ({others})" if others else ""))


def cmd_infer(args: argparse.Namespace) -> int:
    from vajra.client import Client

    if args.stream and args.n != 1:
        raise SystemExit("vajra: --stream prints one choice; leave out --n or --stream")
    cfg = load_args_config(args)
    with Client(gateway_address(cfg, args), api_key(args), timeout_s=args.timeout) as client:
        kw: dict[str, Any] = dict(
            adapter=args.adapter,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop=args.stop or None,
            seed=args.seed,
            logprobs=args.logprobs,
            response_format=_response_format(args),
        )
        usage: Usage | None = None
        if args.stream:
            logprobs: list[TokenLogprob] = []
            for chunk in client.stream(args.prompt, **kw):
                print(chunk.text, end="", flush=True)
                logprobs += chunk.logprobs
                usage = chunk.usage or usage
            print()
            _print_logprobs(logprobs)
        else:
            result = client.infer(args.prompt, n=args.n, **kw)
            for choice in result.choices:
                if args.n > 1:
                    print(f"--- choice {choice.index} ---")
                print(choice.text)
                _print_logprobs(choice.logprobs)
            usage = result.usage
        if args.verbose and usage is not None:
            print(json.dumps(dataclasses.asdict(usage)), file=sys.stderr)
    return 0
