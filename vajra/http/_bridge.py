"""The HTTP bridge as an actor: ``vajra actor http``, or one more process under ``vajra up``."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from vajra.config import VajraConfig
from vajra.http._app import create_app
from vajra.http._chat import ChatTemplate
from vajra.http._context import BridgeContext
from vajra.http._gateway import GatewayPool
from vajra.http._metrics import BridgeMetrics

log = logging.getLogger("vajra.http")


def base_model_name(cfg: VajraConfig) -> str:
    """``http.base_model_name``, else the model directory's name, else ``base``."""
    if cfg.http.base_model_name:
        return cfg.http.base_model_name
    model = cfg.cluster.model
    return Path(model).name if model and model != "null" else "base"


class HttpBridge:
    """Serves the HTTP API on ``http.host:http.port`` in front of ``cluster.gateway_address``.

    ``run`` opens the gateway connections, loads the tokenizer's chat template (in a worker
    thread), binds, and reports its address (``http://HOST:PORT``) through ``task_status``.
    ``drain`` stops accepting connections and lets requests in flight finish for up to
    ``http.graceful_timeout_s``; then ``run`` returns.
    """

    name = "http"

    def __init__(self, cfg: VajraConfig) -> None:
        self.cfg = cfg
        h = cfg.http
        self.pool = GatewayPool(
            cfg.cluster.gateway_address,
            connections=h.gateway_connections,
            timeout_s=h.request_timeout_s,
            health_interval_s=h.health_interval_s,
            health_timeout_s=h.health_timeout_s,
            admin_key=h.admin_key,
        )
        self.metrics = BridgeMetrics(billing_granularity_ms=cfg.policies.billing_granularity_ms)
        self.address = ""
        self._shutdown = trio.Event()
        self._stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        h = self.cfg.http
        async with trio.open_nursery() as nursery:
            await nursery.start(self.pool.run)
            chat = await trio.to_thread.run_sync(ChatTemplate.load, self.cfg.cluster.model)
            ctx = BridgeContext(
                cfg=self.cfg,
                pool=self.pool,
                metrics=self.metrics,
                chat=chat,
                base_model=base_model_name(self.cfg),
            )
            hc = HypercornConfig()
            hc.bind = [f"{h.host}:{h.port}"]
            hc.accesslog = None
            hc.graceful_timeout = h.graceful_timeout_s
            hc.backlog = 2048
            # Bounds both an idle keep-alive connection and the wait for a request's headers
            # (a slow client sending them a byte at a time); bodies: BodySizeLimit.
            hc.keep_alive_timeout = h.idle_timeout_s
            app: Any = create_app(ctx)
            serve_app = partial(serve, app, hc, shutdown_trigger=self._shutdown.wait, mode="asgi")
            binds: list[str] = await nursery.start(self._serve, serve_app, nursery.cancel_scope)
            self.address = binds[0]
            log.info(
                "http bridge at %s, gateway %s", self.address, self.cfg.cluster.gateway_address
            )
            task_status.started(self.address)

    async def _serve(
        self,
        serve_app: partial[Any],
        done: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until the shutdown trigger; then stop the bridge's other tasks."""
        try:
            await serve_app(task_status=task_status)
        finally:
            self._stopped.set()
        done.cancel()

    async def drain(self) -> None:
        """Stop accepting; requests in flight get ``graceful_timeout_s`` to finish."""
        self._shutdown.set()
        with trio.move_on_after(self.cfg.http.graceful_timeout_s + 1.0):
            await self._stopped.wait()
