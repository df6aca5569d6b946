"""``vajra train``: queue a fine-tuning job of an adapter on a JSON Lines dataset.

::

    vajra train --key K --adapter support-bot --data train.jsonl --epochs 3 --follow
    vajra train --adapter new-bot --fresh --rank 8 --target-modules q_proj,v_proj \\
        --data s3://vajra/datasets/<tenant_id>/train.jsonl

Every other training parameter goes as ``--param NAME=VALUE`` (a JSON value, e.g.
``--param grad_accum_steps=2``). The job is checked by the gateway before it is queued; bad
input exits 1 naming the problem. ``--follow`` then shows its progress (``vajra job status
ID --follow``).
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from vajra.cli._common import with_config
from vajra.cli._job import add_client_flags, client_for, follow, job_json
from vajra.errors import InvalidRequest

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands


def register(sub: Subcommands) -> None:
    t = with_config(sub.add_parser("train", help="fine-tune an adapter on a JSON Lines dataset"))
    t.add_argument("--adapter", required=True, help="the adapter to train (NAME)")
    t.add_argument("--data", required=True, help="a JSON Lines file, or s3://bucket/key")
    t.add_argument("--from-version", type=int, help="start from this version (default: active)")
    t.add_argument("--fresh", action="store_true", help="start a new adapter (--rank, modules)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--learning-rate", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--max-steps", type=int)
    t.add_argument("--rank", type=int)
    t.add_argument("--alpha", type=float)
    t.add_argument("--target-modules", help="comma-separated, e.g. q_proj,v_proj")
    t.add_argument("--seed", type=int)
    t.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="another parameter"
    )
    t.add_argument("--follow", action="store_true", help="show progress until it finishes")
    t.add_argument("--follow-timeout", type=float, default=86_400.0, help="seconds (a day)")
    add_client_flags(t, timeout=300.0)
    t.set_defaults(func=cmd_train)


def extra_params(pairs: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs; VALUE is read as JSON, else taken as a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, eq, text = pair.partition("=")
        if not eq or not name:
            raise InvalidRequest(f"--param takes NAME=VALUE, not {pair!r}", field="param")
        try:
            out[name] = json.loads(text)
        except ValueError:
            out[name] = text
    return out


def cmd_train(args: argparse.Namespace) -> int:
    modules = None
    if args.target_modules:
        modules = [m.strip() for m in args.target_modules.split(",") if m.strip()]
    with client_for(args) as client:
        job = client.train(
            args.adapter,
            args.data,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            max_steps=args.max_steps,
            rank=args.rank,
            alpha=args.alpha,
            target_modules=modules,
            seed=args.seed,
            from_version=args.from_version,
            fresh=args.fresh,
            **extra_params(args.param),
        )
        info = job.last
        assert info is not None
        if args.json:
            print(json.dumps(job_json(info)), flush=True)
        else:
            print(f"job {info.job_id} queued: {info.adapter}, {info.total_steps} steps", flush=True)
        if args.follow:
            return follow(job, args.json, args.follow_timeout)
    return 0
