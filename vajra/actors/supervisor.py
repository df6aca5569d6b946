"""``vajra up``: run the whole cluster on one machine and keep it running.

The supervisor owns no serving logic. It prepares ``VAJRA_HOME`` (an embedded Valkey when no
``VAJRA_REDIS_URL`` is given, a tiny model when no model directory is given, a runtime config
file with concrete addresses), starts each actor as its own process (``vajra actor NAME``),
restarts any that exits, writes ``cluster.json`` so the CLI and SDK can find the cluster, and
on SIGINT/SIGTERM stops the actors in order — gateway first, ledger last, the embedded Valkey
after them — within about 15 s.

Process tree and what keeps it tidy:

- **One cluster per home** (:mod:`vajra.actors.home`): a lock held by every process of the
  cluster; a second ``vajra up`` fails fast, or waits (bounded) for a dead one's actors, and
  never binds the first one's ipc sockets; ports in use fail the start with one line.
- **Actors die with the supervisor.** Each actor runs in its own session (a terminal's Ctrl-C
  reaches only the supervisor, which then stops them in order) and inherits the read end of a
  *lifeline pipe* whose only write end the supervisor holds; when the supervisor exits, even
  by ``kill -9``, the pipe closes and every actor drains and exits on its own
  (:func:`vajra.actors.base.serve_until_signalled`).
- **The embedded Valkey is supervised** (:class:`~vajra.actors.valkey_keeper.ValkeyKeeper`):
  restarted on its port and data directory, outside the terminal's process group, stopped
  after the ledger; a reaper stops it if the supervisor is killed.
- **Secrets.** ``run/`` is 0700; ``cluster.toml`` (admin key, Redis URL with password) and
  ``cluster.json`` are 0600; the Redis password is masked in what is printed and logged.
- **Devices.** Executors get GPUs round-robin (:func:`executor_devices`), ``--devices`` to choose.
- **Executors on demand.** With ``provisioning.local_executor_start``, more executors are
  started when the scheduler asks and stopped when idle
  (:mod:`vajra.actors.executor_scaler`), supervised like the others.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import trio

from vajra.actors.actor_processes import (
    EXECUTOR_PORT_OFFSET,
    PORT_OFFSETS,
    ActorProcess,
    actor_processes,
    stop_actor,
)
from vajra.actors.base import HOME_LOCK_FD_ENV, PARENT_FD_ENV
from vajra.actors.cluster_ready import wait_cluster_ready
from vajra.actors.devices import executor_devices, parse_devices, visible_gpu_count
from vajra.actors.executor_scaler import ExecutorScaler
from vajra.actors.home import HomeLock, StartupError, check_port_free, tcp_endpoint
from vajra.actors.valkey_keeper import ValkeyKeeper
from vajra.config import VajraConfig, dump_toml
from vajra.state import redact_url
from vajra.state.embedded import (
    make_private_dir,
    write_private_file,
)

log = logging.getLogger("vajra.supervisor")

CLUSTER_FILE = "cluster.json"
LOCK_FILE = "lock"
VALKEY_PID_FILE = "valkey.pid"
_MIN_BACKOFF_S = 0.25
_MAX_BACKOFF_S = 5.0
#: An actor that exits this many times before the cluster is ready fails ``vajra up``.
_MAX_STARTUP_EXITS = 3


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
    except (FileNotFoundError, PermissionError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


# --- the supervisor ---------------------------------------------------------------------------


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
        self.run_dir = self.home / "run"
        self.gateway_port = gateway_port
        self.n_executors = executors if executors is not None else cfg.cluster.executors
        self.model = model if model is not None else cfg.cluster.model
        self.actors: list[ActorProcess] = []
        self.valkey: ValkeyKeeper | None = None
        self.runtime_cfg: VajraConfig | None = None
        self.lock = HomeLock(self.run_dir / LOCK_FILE)
        self._ready = False
        self._lifeline: tuple[int, int] | None = None  # (read end for children, write end)

    # --- before anything starts -------------------------------------------------------------

    def _addresses(self) -> tuple[str, int]:
        """The gateway's client address and the HTTP port, with port 0 made concrete."""
        gateway_address = (
            f"tcp://127.0.0.1:{self.gateway_port}"
            if self.gateway_port is not None
            else self.cfg.cluster.gateway_address
        )
        if gateway_address.endswith(":0"):
            gateway_address = free_tcp_address()
        http_port = self.cfg.http.port
        if self.cfg.http.enabled and http_port == 0:
            http_port = int(free_tcp_address().rsplit(":", 1)[1])
        return gateway_address, http_port

    def _check_ports(self, gateway_address: str, http_port: int) -> None:
        endpoint = tcp_endpoint(gateway_address)
        if endpoint is not None:
            check_port_free(*endpoint, "gateway")
        if self.cfg.http.enabled:
            check_port_free(self.cfg.http.host, http_port, "HTTP")
        base = self.cfg.cluster.metrics_port
        if base > 0:
            offsets = [*PORT_OFFSETS.values()]
            offsets += [EXECUTOR_PORT_OFFSET + i for i in range(self.n_executors)]
            for offset in offsets:
                check_port_free("127.0.0.1", base + offset, "metrics")

    async def _executor_devices(self, chosen: list[int] | None) -> list[str | None]:
        """Each executor's ``--device`` (None: leave ``executor.device`` as configured)."""
        n = self.n_executors
        if chosen is None and (self.cfg.executor.device != "auto" or n <= 1):
            # One executor on "auto" already takes cuda:0, or the CPU without CUDA.
            return [None] * n
        visible = await visible_gpu_count()
        try:
            return list(executor_devices(n, visible, chosen))
        except ValueError as exc:
            raise StartupError(str(exc)) from None

    # --- running ------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[dict[str, Any]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start everything, report ``cluster.json``'s content, and supervise until cancelled.

        Raises StartupError, with nothing left running, when the cluster cannot start.
        """
        try:
            chosen = parse_devices(self.cfg.cluster.devices)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        make_private_dir(self.run_dir)
        await self.lock.acquire()
        try:
            (self.home / CLUSTER_FILE).unlink(missing_ok=True)  # a dead cluster's
            gateway_address, http_port = self._addresses()
            self._check_ports(gateway_address, http_port)
            devices = await self._executor_devices(chosen)
            self._lifeline = os.pipe()  # both ends non-inheritable; the read end is passed on
            async with trio.open_nursery() as nursery:
                redis_url = self.cfg.cluster.redis_url
                if not redis_url:
                    self.valkey = ValkeyKeeper(
                        self.home,
                        self.run_dir,
                        lifeline_fd=self._lifeline[0],
                        lock_path=self.lock.path,
                    )
                    redis_url = await nursery.start(self.valkey.run)
                cfg = self.runtime_cfg = await self._prepare(
                    redis_url, gateway_address, http_port, devices
                )
                env = {k: v for k, v in os.environ.items() if not k.startswith("VAJRA_")}
                env["PYTHONUNBUFFERED"] = "1"
                env[PARENT_FD_ENV] = str(self._lifeline[0])
                env[HOME_LOCK_FD_ENV] = str(self.lock.fd)
                for actor in self.actors:
                    nursery.start_soon(self._keep_running, actor, env)
                await wait_cluster_ready(cfg, self.n_executors)
                self._ready = True
                if cfg.provisioning.local_executor_start:
                    nursery.start_soon(self._scaler(cfg, devices, nursery, env).run)
                info = {
                    "gateway_address": cfg.cluster.gateway_address,
                    "redis_url": cfg.cluster.redis_url,
                    "model": cfg.cluster.model,
                    "executors": [f"exec-{i}" for i in range(self.n_executors)],
                    "supervisor_pid": os.getpid(),
                    "config": str(self.run_dir / "cluster.toml"),
                }
                if cfg.http.enabled:
                    info["http_address"] = f"http://{cfg.http.host}:{cfg.http.port}"
                write_private_file(self.home / CLUSTER_FILE, json.dumps(info, indent=2))
                task_status.started(info)
        finally:
            with trio.CancelScope(shield=True):
                await self._stop_all()
                (self.home / CLUSTER_FILE).unlink(missing_ok=True)
                if self.valkey is not None:
                    await self.valkey.stop()
                self._close_lifeline()
                self.lock.release()
                if self.valkey is not None:
                    await self.valkey.wait_reaper()

    async def _prepare(
        self, redis_url: str, gateway_address: str, http_port: int, devices: list[str | None]
    ) -> VajraConfig:
        model = self.model
        if not model:
            model = str(self.home / "models" / "tiny")
            if not (Path(model) / "config.json").exists():
                from vajra.gpu.tiny import init_tiny_model

                log.info("no model given: building a tiny random-weight model in %s", model)
                await trio.to_thread.run_sync(init_tiny_model, Path(model))
        run_dir = self.run_dir
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
        if cfg.http.enabled:
            cfg = cfg.replace("http", port=http_port)
        config_path = run_dir / "cluster.toml"
        # The admin key and the Redis password are in there: owner only.
        write_private_file(config_path, dump_toml(cfg))
        self.actors = actor_processes(cfg, config_path, devices)
        return cfg

    async def _keep_running(self, actor: ActorProcess, env: dict[str, str]) -> None:
        assert self._lifeline is not None and self.lock.fd is not None
        inherited = (self._lifeline[0], self.lock.fd)
        backoff = _MIN_BACKOFF_S
        while not actor.stopping:
            actor.exited = trio.Event()
            started = trio.current_time()
            try:
                # Own session: a Ctrl-C in the terminal reaches only the supervisor, which then
                # stops the actors in order (gateway first, ledger last). The lifeline's read
                # end tells the actor when the supervisor is gone; the lock's copy keeps the
                # home taken until the actor has exited.
                actor.process = await trio.lowlevel.open_process(
                    actor.argv, env=env, start_new_session=True, pass_fds=inherited
                )
                await actor.process.wait()
            finally:
                actor.exited.set()
            if actor.stopping:
                return
            code = actor.process.returncode
            actor.restarts += 1
            if not self._ready and actor.restarts >= _MAX_STARTUP_EXITS:
                raise StartupError(
                    f"the {actor.name} actor exited {actor.restarts} times while the cluster "
                    f"was starting (last exit code {code}); its log is above"
                )
            if trio.current_time() - started > 30:
                backoff = _MIN_BACKOFF_S
            log.warning("%s exited with %s; restarting in %.2fs", actor.name, code, backoff)
            await trio.sleep(backoff)
            backoff = min(_MAX_BACKOFF_S, backoff * 2)

    def _scaler(
        self,
        cfg: VajraConfig,
        devices: list[str | None],
        nursery: trio.Nursery,
        env: dict[str, str],
    ) -> ExecutorScaler:
        """Executors started on demand (:mod:`vajra.actors.executor_scaler`), run like the
        others; one it retires leaves :attr:`actors` once its process has exited."""

        def spawn(actor: ActorProcess) -> None:
            self.actors.append(actor)
            nursery.start_soon(self._keep_running, actor, env)

        async def retire(name: str) -> None:
            for actor in [a for a in self.actors if a.name == name]:
                await stop_actor(actor, grace_s=cfg.executor.drain_timeout_s + 5.0)
                self.actors.remove(actor)

        path = self.run_dir / "cluster.toml"
        return ExecutorScaler(cfg, path, base_devices=devices, spawn=spawn, retire=retire)

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
            if any(a.process is not None for a in stage):
                log.info("stopped %s", ", ".join(a.name for a in stage))

    def _close_lifeline(self) -> None:
        lifeline, self._lifeline = self._lifeline, None
        if lifeline is not None:
            for fd in lifeline:
                os.close(fd)


async def run_supervisor(sup: Supervisor, *, notes: Sequence[str] = ()) -> int:
    """Run until SIGINT/SIGTERM; print the addresses (and ``notes``, one ``vajra: ...`` line
    each) once the cluster is ready.

    Returns 0 after a stop, 1 (with one ``vajra: ...`` line on stderr) when the cluster
    could not start. Signals that arrive while it is stopping are taken and ignored until
    the end, so a second Ctrl-C can neither interrupt the ordered shutdown halfway nor be
    redelivered as a KeyboardInterrupt afterwards.
    """
    failure: StartupError | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as guard:
            serving = trio.CancelScope()
            guard.start_soon(_take_signals, signals, serving)
            with serving:
                try:
                    async with trio.open_nursery() as nursery:
                        info = await nursery.start(sup.run)
                        print(f"vajra: gateway {info['gateway_address']}", flush=True)
                        if "http_address" in info:
                            print(f"vajra: http {info['http_address']}", flush=True)
                        print(f"vajra: redis {redact_url(info['redis_url'])}", flush=True)
                        for note in notes:
                            print(f"vajra: {note}", flush=True)
                        print("vajra: ready (Ctrl-C to stop)", flush=True)
                except* StartupError as group:
                    failure = _first_leaf(group)
            guard.cancel_scope.cancel()
    if failure is not None:
        print(f"vajra: {failure}", file=sys.stderr, flush=True)
        return 1
    return 0


def _first_leaf(exc: BaseException) -> StartupError | None:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc if isinstance(exc, StartupError) else None


async def _take_signals(signals: AsyncIterator[int], serving: trio.CancelScope) -> None:
    """The first signal stops the cluster; later ones are only acknowledged."""
    async for _ in signals:
        if serving.cancel_called:
            print("vajra: already stopping; the actors are draining", flush=True)
        else:
            print("vajra: stopping", flush=True)
            serving.cancel()
