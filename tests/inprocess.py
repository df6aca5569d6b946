"""Actors run in one Trio run for tests: their configuration on ipc sockets in a temp dir."""

from __future__ import annotations

from pathlib import Path

from vajra.config import VajraConfig


def inprocess_config(run_dir: Path, redis_url: str, *, model: str = "null") -> VajraConfig:
    """A cluster config whose internal sockets are ipc files in ``run_dir`` (created) and
    whose gateway listens on a free loopback port."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return VajraConfig().replace(
        "cluster",
        home=str(run_dir / "home"),  # executors' usage journals stay with the test
        redis_url=redis_url,
        model=model,
        gateway_address="tcp://127.0.0.1:0",
        gateway_backend_address=f"ipc://{run_dir}/gw",
        scheduler_address=f"ipc://{run_dir}/sched",
        scheduler_dispatch_address=f"ipc://{run_dir}/dispatch",
        events_address=f"ipc://{run_dir}/events",
        ledger_address=f"ipc://{run_dir}/ledger",
    )
