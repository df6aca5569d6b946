"""``vajra up``: run the whole cluster on one machine and keep it running.

The supervisor owns no serving logic. It prepares ``VAJRA_HOME`` (an embedded Valkey when no
``VAJRA_REDIS_URL`` is given, a tiny model when no model directory is given, a runtime config
file with concrete addresses), starts each actor as its own process (``vajra actor NAME``),
restarts any that exits, writes ``cluster.json`` so the CLI and SDK can find the cluster, and
on SIGINT/SIGTERM stops the actors in order — gateway first, ledger last — within 10 s.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from vajra.config import VajraConfig, dump_toml
from vajra.state import AsyncClusterState, EmbeddedValkey

log = logging.getLogger("vajra.supervisor")

CLUSTER_FILE = "cluster.json"
_STOP_BUDGET_S = 9.0
#: Metrics ports from ``cluster.metrics_port`` (see vajra/actors/metrics.py); exec-N: 10 + N.
PORT_OFFSETS = {"gateway": 0, "scheduler": 1, "predictor": 2, "ledger": 3}
EXECUTOR_PORT_OFFSET = 10
_MAX_BACKOFF_S = 5.0


@dataclass
class ActorProcess:
    """One supervised actor: how to start it, and its current process."""

    name: str
    argv: list[str]
    process: trio.Process | None = None
    restarts: int = 0
    stopping: bool = False
    exited: trio.Event = field(default_factory=trio.Event)


def free_tcp_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _internal_address(run_dir: Path, name: str) -> str:
    path = run_dir / f"{name}.sock"
    if len(str(path)) < 100:  # the kernel's limit for a unix socket path is 107 bytes
        return f"ipc://{path}"
    return free_tcp_address()


def read_cluster_file(home: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((home / CLUSTER_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


class Supervisor:
    name = "supervisor"

    def __init__(
        self,
        cfg: VajraConfig,
        *,
        gateway_port: int | None = None,
        executors: int | None = None,
        model: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.home = cfg.cluster.home_path
        self.gateway_port = gateway_port
        self.n_executors = executors if executors is not None else cfg.cluster.executors
        self.model = model if model is not None else cfg.cluster.model
        self.actors: list[ActorProcess] = []
        self.valkey: EmbeddedValkey | None = None
        self.runtime_cfg: VajraConfig | None = None

    # --- preparation --------------------------------------------------------------------

    async def _prepare(self) -> VajraConfig:
        run_dir = self.home / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        redis_url = self.cfg.cluster.redis_url
        if not redis_url:
            self.valkey = EmbeddedValkey(data_dir=self.home / "valkey")
            redis_url = await trio.to_thread.run_sync(self.valkey.start)
            log.info("embedded valkey at %s", redis_url)
        model = self.model
        if not model:
            model = str(self.home / "models" / "tiny")
            if not (Path(model) / "config.json").exists():
                from vajra.gpu.tiny import init_tiny_model

                log.info("no model given: building a tiny random-weight model in %s", model)
                await trio.to_thread.run_sync(init_tiny_model, Path(model))
        gateway_address = (
            f"tcp://127.0.0.1:{self.gateway_port}"
            if self.gateway_port is not None
            else self.cfg.cluster.gateway_address
        )
        if gateway_address.endswith(":0"):
            gateway_address = free_tcp_address()
        cfg = self.cfg.replace(
            "cluster",
            home=str(self.home),
            redis_url=redis_url,
            model=model,
            executors=self.n_executors,
            gateway_address=gateway_address,
            gateway_backend_address=_internal_address(run_dir, "gateway-backend"),
            scheduler_address=_internal_address(run_dir, "scheduler"),
            scheduler_dispatch_address=_internal_address(run_dir, "dispatch"),
            events_address=_internal_address(run_dir, "events"),
            ledger_address=_internal_address(run_dir, "ledger"),
        )
        if cfg.http.enabled and cfg.http.port == 0:
            cfg = cfg.replace("http", port=int(free_tcp_address().rsplit(":", 1)[1]))
        config_path = run_dir / "cluster.toml"
        config_path.write_text(dump_toml(cfg))
        base = [sys.executable, "-m", "vajra", "actor"]
        conf = ["--config", str(config_path)]
        self.actors = [
            ActorProcess(
                "ledger", [*base, "ledger", *conf, *_metrics_arg(cfg, PORT_OFFSETS["ledger"])]
            ),
            ActorProcess(
                "scheduler",
                [*base, "scheduler", *conf, *_metrics_arg(cfg, PORT_OFFSETS["scheduler"])],
            ),
            ActorProcess(
                "predictor",
                [*base, "predictor", *conf, *_metrics_arg(cfg, PORT_OFFSETS["predictor"])],
            ),
            *(
                ActorProcess(
                    f"executor-{i}",
                    [
                        *base,
                        "executor",
                        *conf,
                        "--executor-id",
                        f"exec-{i}",
                        *_metrics_arg(cfg, EXECUTOR_PORT_OFFSET + i),
                    ],
                )
                for i in range(self.n_executors)
            ),
            ActorProcess(
                "gateway", [*base, "gateway", *conf, *_metrics_arg(cfg, PORT_OFFSETS["gateway"])]
            ),
        ]
        if cfg.http.enabled:
            self.actors.append(ActorProcess("http", [*base, "http", *conf]))
        return cfg

    # --- running ------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.runtime_cfg = await self._prepare()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAJRA_")}
        env["PYTHONUNBUFFERED"] = "1"
        try:
            async with trio.open_nursery() as nursery:
                for actor in self.actors:
                    nursery.start_soon(self._keep_running, actor, env)
                await self._wait_ready(cfg)
                info = {
                    "gateway_address": cfg.cluster.gateway_address,
                    "redis_url": cfg.cluster.redis_url,
                    "model": cfg.cluster.model,
                    "executors": [f"exec-{i}" for i in range(self.n_executors)],
                    "supervisor_pid": os.getpid(),
                    "config": str(self.home / "run" / "cluster.toml"),
                }
                if cfg.http.enabled:
                    info["http_address"] = f"http://{cfg.http.host}:{cfg.http.port}"
                (self.home / CLUSTER_FILE).write_text(json.dumps(info, indent=2))
                task_status.started(info)
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_all()
                (self.home / CLUSTER_FILE).unlink(missing_ok=True)
                if self.valkey is not None:
                    await trio.to_thread.run_sync(self.valkey.stop)

    async def _keep_running(self, actor: ActorProcess, env: dict[str, str]) -> None:
        backoff = 0.25
        while not actor.stopping:
            actor.exited = trio.Event()
            started = trio.current_time()
            try:
                # Own session: a Ctrl-C in the terminal reaches only the supervisor, which then
                # stops the actors in order (gateway first, ledger last).
                actor.process = await trio.lowlevel.open_process(
                    actor.argv, env=env, start_new_session=True
                )
                await actor.process.wait()
            finally:
                actor.exited.set()
            if actor.stopping:
                return
            code = actor.process.returncode
            actor.restarts += 1
            if trio.current_time() - started > 30:
                backoff = 0.25
            log.warning("%s exited with %s; restarting in %.2fs", actor.name, code, backoff)
            await trio.sleep(backoff)
            backoff = min(_MAX_BACKOFF_S, backoff * 2)

    async def _wait_ready(self, cfg: VajraConfig) -> None:
        """Wait until the gateway answers and every executor has a heartbeat."""
        from vajra.client import AsyncClient

        state = AsyncClusterState.from_url(cfg.cluster.redis_url)
        want = {f"exec-{i}" for i in range(self.n_executors)}
        try:
            while True:
                beats = {hb.executor_id for hb in await state.list_heartbeats()}
                if want <= beats:
                    break
                await trio.sleep(0.1)
        finally:
            await state.aclose()
        while True:
            try:
                async with AsyncClient(cfg.cluster.gateway_address, api_key="", timeout_s=1.0) as c:
                    await c.stats()
                break
            except Exception:  # the gateway process may still be importing
                await trio.sleep(0.1)
        while cfg.http.enabled:
            try:
                stream = await trio.open_tcp_stream(cfg.http.host, cfg.http.port)
                await stream.aclose()
                return
            except OSError:  # the bridge binds once it is connected and ready
                await trio.sleep(0.1)

    async def _stop_all(self) -> None:
        """Stop in order: gateway, then the rest, the ledger last; SIGKILL what overstays."""
        stages = [
            [a for a in self.actors if a.name in ("gateway", "http")],
            [a for a in self.actors if a.name not in ("gateway", "http", "ledger")],
            [a for a in self.actors if a.name == "ledger"],
        ]
        budget = {0: 4.0, 1: 3.0, 2: 1.5}
        for i, stage in enumerate(stages):
            for a in stage:
                a.stopping = True
                if a.process is not None and a.process.returncode is None:
                    a.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(budget[i]):
                for a in stage:
                    if a.process is not None:
                        await a.process.wait()
            for a in stage:
                if a.process is not None and a.process.returncode is None:
                    log.warning("%s did not stop in time; killing it", a.name)
                    a.process.kill()
                    await a.process.wait()


async def run_supervisor(sup: Supervisor) -> int:
    """Run until SIGINT/SIGTERM; print the addresses once the cluster is ready."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
        info = await nursery.start(sup.run)
        print(f"vajra: gateway {info['gateway_address']}", flush=True)
        if "http_address" in info:
            print(f"vajra: http {info['http_address']}", flush=True)
        print(f"vajra: redis {info['redis_url']}", flush=True)
        print("vajra: ready (Ctrl-C to stop)", flush=True)
    return 0


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            print("vajra: stopping", flush=True)
            scope.cancel()
            return


def _metrics_arg(cfg: VajraConfig, offset: int) -> list[str]:
    """``--metrics-port`` for the actor at ``offset`` from ``cluster.metrics_port`` (if set)."""
    port = cfg.cluster.metrics_port
    return ["--metrics-port", str(port + offset)] if port > 0 else []
