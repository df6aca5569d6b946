"""Which actors ``vajra up`` runs, in start order, and the command line of each."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vajra.config import VajraConfig

log = logging.getLogger("vajra.supervisor")

#: Metrics ports from ``cluster.metrics_port`` (see vajra/actors/metrics.py); exec-N: 10 + N.
PORT_OFFSETS = {"gateway": 0, "scheduler": 1, "predictor": 2, "ledger": 3}
EXECUTOR_PORT_OFFSET = 10
_BASE = (sys.executable, "-m", "vajra", "actor")


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
    base = [*_BASE]
    conf = ["--config", str(config_path)]
    actors = [
        ActorProcess(name, [*base, name, *conf, *_metrics_arg(cfg, PORT_OFFSETS[name])])
        for name in ("ledger", "scheduler", "predictor")
    ]
    actors += [
        executor_process(cfg, config_path, i, device) for i, device in enumerate(executor_devices)
    ]
    actors.append(
        ActorProcess(
            "gateway", [*base, "gateway", *conf, *_metrics_arg(cfg, PORT_OFFSETS["gateway"])]
        )
    )
    if cfg.http.enabled:
        actors.append(ActorProcess("http", [*base, "http", *conf]))
    return actors


def executor_process(
    cfg: VajraConfig, config_path: Path, index: int, device: str | None, *, metrics: bool = True
) -> ActorProcess:
    """Executor ``exec-{index}`` on ``device`` (None: as ``executor.device`` says), with its
    metrics port (``cluster.metrics_port`` + 10 + index) unless ``metrics`` is False."""
    argv = [*_BASE, "executor", "--config", str(config_path), "--executor-id", f"exec-{index}"]
    if metrics:
        argv += _metrics_arg(cfg, EXECUTOR_PORT_OFFSET + index)
    if device is not None:
        argv += ["--device", device]
    return ActorProcess(f"executor-{index}", argv)


def _metrics_arg(cfg: VajraConfig, offset: int) -> list[str]:
    """``--metrics-port`` for the actor at ``offset`` from ``cluster.metrics_port`` (if set)."""
    port = cfg.cluster.metrics_port
    return ["--metrics-port", str(port + offset)] if port > 0 else []


async def stop_actor(actor: ActorProcess, *, grace_s: float) -> None:
    """Stop one supervised actor for good: SIGTERM (it drains), SIGKILL after ``grace_s``;
    returns once its process has exited and its supervising task will not restart it."""
    actor.stopping = True
    if actor.process is not None and actor.process.returncode is None:
        actor.process.send_signal(signal.SIGTERM)
    with trio.move_on_after(grace_s):
        await actor.exited.wait()
    if actor.process is not None and actor.process.returncode is None:
        log.warning("%s did not stop in time; killing it", actor.name)
        actor.process.kill()
        await actor.exited.wait()
