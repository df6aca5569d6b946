"""Which actors ``vajra up`` runs, in start order, and the command line of each."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vajra.config import VajraConfig

#: Metrics ports from ``cluster.metrics_port`` (see vajra/actors/metrics.py); exec-N: 10 + N.
PORT_OFFSETS = {"gateway": 0, "scheduler": 1, "predictor": 2, "ledger": 3}
EXECUTOR_PORT_OFFSET = 10


@dataclass
class ActorProcess:
    """One supervised actor: how to start it, and its current process."""

    name: str
    argv: list[str]
    process: trio.Process | None = None
    restarts: int = 0
    stopping: bool = False
    exited: trio.Event = field(default_factory=trio.Event)


def actor_processes(
    cfg: VajraConfig, config_path: Path, executor_devices: Sequence[str | None]
) -> list[ActorProcess]:
    """The actors ``vajra up`` runs for ``cfg``, in start order; executor ``i`` gets
    ``--device executor_devices[i]`` (none when that is None)."""
    base = [sys.executable, "-m", "vajra", "actor"]
    conf = ["--config", str(config_path)]

    def executor(i: int) -> ActorProcess:
        device = executor_devices[i]
        argv = [*base, "executor", *conf, "--executor-id", f"exec-{i}"]
        argv += [*_metrics_arg(cfg, EXECUTOR_PORT_OFFSET + i)]
        if device is not None:
            argv += ["--device", device]
        return ActorProcess(f"executor-{i}", argv)

    actors = [
        ActorProcess(name, [*base, name, *conf, *_metrics_arg(cfg, PORT_OFFSETS[name])])
        for name in ("ledger", "scheduler", "predictor")
    ]
    actors += [executor(i) for i in range(len(executor_devices))]
    actors.append(
        ActorProcess(
            "gateway", [*base, "gateway", *conf, *_metrics_arg(cfg, PORT_OFFSETS["gateway"])]
        )
    )
    if cfg.http.enabled:
        actors.append(ActorProcess("http", [*base, "http", *conf]))
    return actors


def _metrics_arg(cfg: VajraConfig, offset: int) -> list[str]:
    """``--metrics-port`` for the actor at ``offset`` from ``cluster.metrics_port`` (if set)."""
    port = cfg.cluster.metrics_port
    return ["--metrics-port", str(port + offset)] if port > 0 else []
