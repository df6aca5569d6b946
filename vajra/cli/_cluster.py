"""``vajra up`` (the whole cluster on this machine) and ``vajra actor`` (one actor process).

``vajra up`` hands the work to :mod:`vajra.actors.supervisor`; this module turns the command
line into its configuration and says, once the cluster is ready, where the admin key lives
(never the key itself).
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from vajra.cli._common import load_args_config, with_config
from vajra.config import VajraConfig

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands

#: The variable that sets ``http.admin_key`` (see vajra/config.py).
ADMIN_KEY_ENV = "VAJRA_HTTP_ADMIN_KEY"
ACTOR_NAMES = ("gateway", "scheduler", "predictor", "ledger", "executor", "http")


def register(sub: Subcommands) -> None:
    up = with_config(sub.add_parser("up", help="run the whole cluster on this machine"))
    up.add_argument(
        "--model",
        help="local Hugging Face model directory (default: a tiny random-weight model, built "
        "once in $VAJRA_HOME/models/tiny)",
    )
    up.add_argument(
        "--executors",
        type=int,
        help="executor processes, one per GPU (default: cluster.executors, 1)",
    )
    up.add_argument(
        "--gateway-port",
        type=int,
        help="gateway TCP port on 127.0.0.1, 0: any free one (default: the port of "
        "cluster.gateway_address, 5555)",
    )
    up.add_argument(
        "--http-port",
        type=int,
        help="HTTP bridge port, 0: any free one (default: 8080; [http] enabled = false "
        "turns the bridge off unless this is given)",
    )
    up.add_argument(
        "--devices",
        metavar="0,1",
        help="GPU indices for the executors, round-robin (default: every visible GPU)",
    )
    up.set_defaults(func=cmd_up)

    actor = with_config(sub.add_parser("actor", help="run one actor process"))
    actor.add_argument("name", choices=ACTOR_NAMES)
    actor.add_argument("--executor-id", default="exec-0", help="(default: %(default)s)")
    actor.add_argument("--model", help="override the model directory (executor)")
    actor.add_argument("--metrics-port", type=int, help="serve /metrics on 127.0.0.1:PORT")
    actor.add_argument("--device", help="override executor.device (executor), e.g. cuda:1")
    actor.set_defaults(func=cmd_actor)


def cmd_up(args: argparse.Namespace) -> int:
    import trio

    from vajra.actors.base import configure_logging
    from vajra.actors.supervisor import Supervisor, run_supervisor

    configure_logging("supervisor")
    cfg = load_args_config(args)
    if args.http_port is not None:
        cfg = cfg.replace("http", enabled=True, port=args.http_port)
    if args.devices is not None:
        cfg = cfg.replace("cluster", devices=args.devices)
    sup = Supervisor(
        cfg, gateway_port=args.gateway_port, executors=args.executors, model=args.model
    )
    note = admin_key_note(
        cfg, config_file=args.config, env=os.environ, runtime_file=sup.run_dir / "cluster.toml"
    )
    return trio.run(functools.partial(run_supervisor, sup, notes=[note]))


def admin_key_note(
    cfg: VajraConfig, *, config_file: str | None, env: Mapping[str, str], runtime_file: Path
) -> str:
    """Where the admin key of a cluster started with ``cfg`` comes from, without the key.

    The key reaches ``cfg`` from ``$VAJRA_HTTP_ADMIN_KEY`` or from ``--config FILE``; the
    supervisor copies it into the cluster's own ``run/cluster.toml`` (owner only).
    """
    key = cfg.http.admin_key
    if not key:
        return (
            "admin key: none, so the admin routes are off "
            f"(set {ADMIN_KEY_ENV} before `vajra up` to turn them on)"
        )
    if env.get(ADMIN_KEY_ENV) == key:
        source = f"${ADMIN_KEY_ENV}"
    else:
        source = f"http.admin_key in {config_file}" if config_file else "http.admin_key"
    return f"admin key: {source} (the cluster's copy: http.admin_key in {runtime_file})"


def actor_config(args: argparse.Namespace) -> VajraConfig:
    cfg = load_args_config(args)
    if args.device:
        cfg = cfg.replace("executor", device=args.device)
    return cfg


def cmd_actor(args: argparse.Namespace) -> int:
    from vajra.actors import run_actor_process

    cfg = actor_config(args)
    return run_actor_process(
        args.name,
        cfg,
        executor_id=args.executor_id,
        model=args.model,
        metrics_port=args.metrics_port,
    )
