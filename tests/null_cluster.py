"""A model-less cluster for wire, SDK and HTTP format tests, from blocking code or Trio.

Scheduler, one executor on the null engine (:mod:`vajra.gpu.null_engine`: deterministic
replies and log-probabilities, every decoding field it can honour honoured), the gateway and
the HTTP bridge run in one Trio run in a thread of their own, against a Valkey of their own
(other tests flush theirs). Starting takes about a second; one serves the whole session.

Test rules: loopback and ipc only; free ports; every wait bounded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from tests.inprocess import inprocess_config
from vajra.actors.executor import Executor
from vajra.actors.gateway import Gateway
from vajra.actors.scheduler import Scheduler
from vajra.gpu.interface import GenerationRequest
from vajra.gpu.null_engine import NullEngine
from vajra.http import HttpBridge
from vajra.state import ClusterState, EmbeddedValkey

#: The model name the bridge serves (``http.base_model_name``).
MODEL = "null"
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class NullCluster:
    gateway: str  # the ZeroMQ address for the SDK
    http: str  # the bridge's base URL
    api_key: str
    tenant_id: str
    engine: NullEngine  # lives in the cluster's thread: read it, never call it

    def admitted(self, prompt: str) -> list[GenerationRequest]:
        """The requests for ``prompt`` the engine admitted (most recent last)."""
        return [r for r in list(self.engine.admitted) if r.prompt == prompt]


@contextmanager
def null_cluster(tmp: Path) -> Iterator[NullCluster]:
    valkey = EmbeddedValkey(tmp / "valkey")
    url = valkey.start()
    try:
        cfg = inprocess_config(tmp / "run", url).replace(
            "http", port=0, base_model_name=MODEL, request_timeout_s=30.0
        )
        with ClusterState(url) as state:
            tenant, key = state.tenants.create("formats")
        ready: queue.Queue[tuple[str, str, NullEngine, trio.lowlevel.TrioToken] | BaseException]
        ready = queue.Queue()
        stop: list[trio.Event] = []

        async def main() -> None:
            with ClusterState(url) as state:
                async with trio.open_nursery() as nursery:
                    await nursery.start(Scheduler(cfg).run)
                    executor = Executor(cfg, state, executor_id="exec-0", model="null")
                    await nursery.start(executor.run)
                    gateway: str = await nursery.start(Gateway(cfg, state).run)
                    bridge = HttpBridge(cfg.replace("cluster", gateway_address=gateway))
                    http: str = await nursery.start(bridge.run)
                    assert isinstance(executor.engine, NullEngine)
                    stop.append(trio.Event())
                    ready.put((gateway, http, executor.engine, trio.lowlevel.current_trio_token()))
                    await stop[0].wait()
                    await bridge.drain()
                    nursery.cancel_scope.cancel()

        def run() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # handed to the test thread, which raises it
                ready.put(exc)

        thread = threading.Thread(target=run, name="null-cluster", daemon=True)
        thread.start()
        started = ready.get(timeout=START_TIMEOUT_S)
        if isinstance(started, BaseException):
            raise RuntimeError("the null cluster did not start") from started
        gateway, http, engine, token = started
        try:
            yield NullCluster(gateway, http, key, tenant.tenant_id, engine)
        finally:
            trio.from_thread.run_sync(stop[0].set, trio_token=token)
            thread.join(timeout=30)
    finally:
        valkey.stop()
