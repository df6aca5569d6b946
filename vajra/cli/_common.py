"""What every command shares: loading the configuration and finding the running cluster.

A command finds a local cluster through ``$VAJRA_HOME/cluster.json`` (written by ``vajra up``
once the cluster is ready, removed when it stops), or through ``--gateway ADDRESS`` /
``VAJRA_REDIS_URL``. The running cluster's own settings are in the file that ``cluster.json``
names under ``config`` (``$VAJRA_HOME/run/cluster.toml``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vajra.config import VajraConfig, load_config

if TYPE_CHECKING:
    #: The subparsers object that each command module adds its commands to.
    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]


def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a command the shared ``--config FILE`` option."""
    sp.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config file; config/vajra.toml lists every key (default: none, built-in "
        "defaults and VAJRA_* variables)",
    )
    return sp


def load_args_config(args: argparse.Namespace) -> VajraConfig:
    """Defaults, then ``--config FILE`` (if given), then ``VAJRA_*`` variables."""
    return load_config(getattr(args, "config", None))


def cluster_info(cfg: VajraConfig) -> dict[str, Any]:
    """``cluster.json`` of the cluster in ``cfg.cluster.home`` ({} when there is none)."""
    from vajra.actors.supervisor import read_cluster_file

    return read_cluster_file(cfg.cluster.home_path) or {}


def is_running(info: dict[str, Any]) -> bool:
    """Whether the supervisor that wrote ``info`` (``cluster.json``) is still alive.

    ``vajra up`` removes the file when it stops; one killed outright leaves it behind.
    """
    pid = info.get("supervisor_pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def running_config_path(cfg: VajraConfig) -> Path | None:
    """The running cluster's ``cluster.toml``, or None when no live cluster is found."""
    info = cluster_info(cfg)
    path = info.get("config")
    if not is_running(info) or not isinstance(path, str) or not Path(path).is_file():
        return None
    return Path(path)


def redis_url(cfg: VajraConfig) -> str:
    url = cfg.cluster.redis_url or cluster_info(cfg).get("redis_url", "")
    if not url:
        raise SystemExit(
            "vajra: no cluster found: start one with `vajra up`, or set VAJRA_REDIS_URL / VAJRA_HOME"
        )
    return str(url)


def gateway_address(cfg: VajraConfig, args: argparse.Namespace) -> str:
    if getattr(args, "gateway", None):
        return str(args.gateway)
    address = cluster_info(cfg).get("gateway_address")
    if not address:
        raise SystemExit(
            "vajra: no cluster found: start one with `vajra up`, or pass --gateway ADDRESS"
        )
    return str(address)


def cluster_config(cfg: VajraConfig, args: argparse.Namespace) -> VajraConfig:
    """The running cluster's own configuration (its ``cluster.toml``: object store, admin
    key) unless ``--config`` was given."""
    if getattr(args, "config", None):
        return cfg
    path = cluster_info(cfg).get("config")
    if isinstance(path, str) and Path(path).is_file():
        return load_config(path)
    return cfg


def api_key(args: argparse.Namespace) -> str:
    """``--key``, else ``$VAJRA_API_KEY`` (read when the command runs, never shown in help)."""
    key = getattr(args, "key", None)
    return str(key) if key is not None else os.environ.get("VAJRA_API_KEY", "")
