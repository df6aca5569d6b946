"""Start one actor as a process: build it from the config, serve until a signal, drain."""

from __future__ import annotations

import logging

import trio

from vajra.actors.base import (
    Actor,
    configure_logging,
    freeze_startup_heap,
    serve_until_signalled,
)
from vajra.config import VajraConfig
from vajra.state import ClusterState

log = logging.getLogger("vajra.actors")

ACTOR_NAMES = ("gateway", "scheduler", "predictor", "ledger", "executor", "http")


def build_actor(
    name: str,
    cfg: VajraConfig,
    state: ClusterState | None,
    *,
    executor_id: str = "exec-0",
    model: str | None = None,
) -> Actor:
    """The actor called ``name``; ``state`` is required by all but the scheduler and http."""
    if name == "scheduler":
        from vajra.actors.scheduler import Scheduler

        return Scheduler(cfg)
    if name == "http":
        from vajra.http import HttpBridge

        return HttpBridge(cfg)
    if state is None:
        raise ValueError(f"the {name} actor needs cluster state (a Redis URL)")
    if name == "gateway":
        from vajra.actors.gateway import Gateway

        return Gateway(cfg, state)
    if name == "ledger":
        from vajra.actors.ledger import Ledger

        return Ledger(cfg, state)
    if name == "predictor":
        from vajra.actors.predictor import Predictor

        return Predictor(cfg, state)
    if name == "executor":
        from vajra.actors.executor import Executor

        return Executor(cfg, state, executor_id=executor_id, model=model)
    raise ValueError(f"unknown actor {name!r}; known: {', '.join(ACTOR_NAMES)}")


def run_actor_process(
    name: str,
    cfg: VajraConfig,
    *,
    executor_id: str = "exec-0",
    model: str | None = None,
    metrics_port: int | None = None,
) -> int:
    """Entry point of ``vajra actor``: returns the process exit code."""
    configure_logging(name if name != "executor" else executor_id)

    async def main() -> None:
        state = ClusterState(cfg.cluster.redis_url) if cfg.cluster.redis_url else None
        try:
            actor = build_actor(name, cfg, state, executor_id=executor_id, model=model)
            if metrics_port:
                from vajra.actors.metrics import serve_actor_metrics

                serve_actor_metrics(actor, metrics_port)
            await serve_until_signalled(actor, on_ready=freeze_startup_heap)
        finally:
            if state is not None:
                state.close()

    trio.run(main)
    return 0
