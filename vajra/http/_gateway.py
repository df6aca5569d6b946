"""The bridge's side of the gateway: shared connections, a health probe, a tenant cache.

Data flows left to right::

    HTTP request ──(caller's key)──▶ a view of one shared AsyncClient ──▶ gateway
    health probe (every health_interval_s) ──stats──▶ gateway ──▶ up / down

The bridge holds no state of its own: the gateway authenticates every request and applies
every per-tenant limit. The probe is a ``ping`` (no key needed); with ``admin_key`` set it
also reads the gateway's counters (for ``/metrics``).

When the probe fails ``_FAILURES_TO_DOWN`` times in a row the gateway is marked down: new
requests get 503 at once and requests waiting on it are cancelled (also 503), so a dead
gateway costs a caller at most about ``interval + 2 x timeout`` seconds, not a deadline.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager

import trio

from vajra.client import AsyncClient, UnavailableError, VajraError

log = logging.getLogger("vajra.http")

_FAILURES_TO_DOWN = 2


class GatewayPool:
    """``connections`` long-lived AsyncClients to ``address``; run with ``nursery.start``."""

    def __init__(
        self,
        address: str,
        *,
        connections: int = 2,
        timeout_s: float = 60.0,
        health_interval_s: float = 0.5,
        health_timeout_s: float = 1.5,
        admin_key: str = "",
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.admin_key = admin_key
        self._n = max(1, connections)
        self._clients: list[AsyncClient] = []
        self._next = itertools.count()
        self._guarded: set[trio.CancelScope] = set()
        self._failures = _FAILURES_TO_DOWN
        self.up = False
        self.gateway_counters: dict[str, int] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the connections, probe once, report started, then probe until cancelled.

        Cancellation closes every connection; requests still waiting on them fail with
        UnavailableError.
        """
        async with AsyncExitStack() as stack:
            for _ in range(self._n):
                client = AsyncClient(self.address, api_key="", timeout_s=self.timeout_s)
                self._clients.append(await stack.enter_async_context(client))
            await self._probe()
            task_status.started()
            while True:
                await trio.sleep(self.health_interval_s)
                await self._probe()

    async def _probe(self) -> None:
        try:
            await self._clients[0].ping(timeout_s=self.health_timeout_s)
            counters = {}
            if self.admin_key:
                counters = await self.operator_client.stats(timeout_s=self.health_timeout_s)
        except VajraError as exc:
            self._failures += 1
            if self._failures >= _FAILURES_TO_DOWN and self.up:
                log.warning("gateway %s does not answer (%s): marking it down", self.address, exc)
                self.up = False
                for scope in list(self._guarded):
                    scope.cancel()
            return
        if not self.up:
            log.info("gateway %s answers: marking it up", self.address)
        self._failures = 0
        self.up = True
        self.gateway_counters = counters

    def client(self, api_key: str) -> AsyncClient:
        """A view of one shared connection that sends ``api_key`` with each request."""
        if not self._clients:
            raise UnavailableError("the bridge is not connected to a gateway yet")
        base = self._clients[next(self._next) % len(self._clients)]
        return base.with_api_key(api_key)

    @property
    def operator_client(self) -> AsyncClient:
        """A connection speaking with the admin key (empty when none is configured)."""
        return self.client(self.admin_key)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run the block while the gateway is up; 503 (UnavailableError) when it is or goes down."""
        if not self.up:
            raise UnavailableError(f"the gateway at {self.address} does not answer; retry later")
        scope = trio.CancelScope()
        self._guarded.add(scope)
        try:
            with scope:
                yield
        finally:
            self._guarded.discard(scope)
        if scope.cancelled_caught:
            raise UnavailableError(f"the gateway at {self.address} stopped answering; retry")
