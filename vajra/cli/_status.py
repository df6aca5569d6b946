"""``vajra status``: the cluster's addresses, its executors' heartbeats and the gateway's
counters, with times written for people (``0.4 s ago``, ISO 8601), not epoch milliseconds."""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from vajra.cli._common import (
    cluster_config,
    cluster_info,
    gateway_address,
    load_args_config,
    redis_url,
    with_config,
)
from vajra.errors import VajraError

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands
    from vajra.state import ExecutorHeartbeat


def register(sub: Subcommands) -> None:
    status = with_config(sub.add_parser("status", help="executors, heartbeats, queue depths"))
    status.add_argument(
        "--gateway",
        help="gateway address, e.g. tcp://127.0.0.1:5555 (default: the running cluster's, "
        "from $VAJRA_HOME/cluster.json)",
    )
    status.set_defaults(func=cmd_status)


def format_age(seconds: float) -> str:
    """How long ago something happened: ``0.4 s ago``, ``2.5 min ago``, ``3.0 h ago``."""
    if seconds < -1.0:  # another machine's clock runs ahead of this one's
        return f"{-seconds:.1f} s from now (clocks differ)"
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s ago"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min ago"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.1f} d ago"


def format_time(epoch_s: float) -> str:
    """An instant as local ISO 8601 with its UTC offset, to the second."""
    return datetime.fromtimestamp(epoch_s).astimezone().isoformat(timespec="seconds")


def heartbeat_line(hb: ExecutorHeartbeat, now_s: float) -> str:
    age = format_age(now_s - hb.updated_ms / 1000)
    return (
        f"  {hb.executor_id}  model={hb.model} device={hb.device} queue={hb.queue_depth} "
        f"running={hb.running} free_mem={hb.free_memory_bytes // 2**20}MiB "
        f"resident={len(hb.resident_adapters)} heartbeat {age} "
        f"({format_time(hb.updated_ms / 1000)})"
    )


def _ready_since(home: Path) -> str:
    """When ``vajra up`` said ready: the time its ``cluster.json`` was written."""
    from vajra.actors.supervisor import CLUSTER_FILE

    try:
        written = (home / CLUSTER_FILE).stat().st_mtime
    except OSError:
        return ""
    return f"  (ready since {format_time(written)}, {format_age(time.time() - written)})"


def cmd_status(args: argparse.Namespace) -> int:
    from vajra.state import ClusterState

    cfg = load_args_config(args)
    info = cluster_info(cfg)
    if info:
        since = _ready_since(cfg.cluster.home_path)
        print(f"gateway  {info.get('gateway_address')}{since}")
        if info.get("http_address"):
            print(f"http     {info['http_address']}")
    with ClusterState(redis_url(cfg)) as state:
        beats = state.heartbeats.list()
    now = time.time()
    print(f"executors: {len(beats)}")
    for hb in beats:
        print(heartbeat_line(hb, now))
    try:
        gateway = gateway_address(cfg, args)
    except SystemExit:
        return 0
    from vajra.client import AuthError, Client

    # The gateway's counters are for operators: ask with the cluster's admin key.
    admin_key = cluster_config(cfg, args).http.admin_key
    try:
        with Client(gateway, admin_key, timeout_s=2.0) as client:
            stats = client.stats()
        print("gateway counters: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    except AuthError:
        print("gateway counters: need the admin key (set http.admin_key)")
    except VajraError as exc:
        print(f"gateway unreachable: {exc}")
    return 0
