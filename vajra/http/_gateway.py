"""The bridge's side of the gateway: shared connections, a health probe, a tenant cache.

Data flows left to right::

    HTTP request ──(caller's key)──▶ a view of one shared AsyncClient ──▶ gateway
    health probe (every health_interval_s) ──stats──▶ gateway ──▶ up / down

The bridge holds no state of its own beyond caches: the gateway authenticates every request.
The tenant cache (key digest → tenant, ``tenant_cache_ttl_s``) only names whose rate and
concurrency budget a request spends; it never admits a request.

When the probe fails ``_FAILURES_TO_DOWN`` times in a row the gateway is marked down: new
requests get 503 at once and requests waiting on it are cancelled (also 503), so a dead
gateway costs a caller at most about ``interval + 2 x timeout`` seconds, not a deadline.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager

import trio

from vajra.client import AsyncClient, Tenant, UnavailableError, VajraError

log = logging.getLogger("vajra.http")

_FAILURES_TO_DOWN = 2
_MAX_CACHED_TENANTS = 100_000


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
        tenant_cache_ttl_s: float = 10.0,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.tenant_cache_ttl_s = tenant_cache_ttl_s
        self._n = max(1, connections)
        self._clients: list[AsyncClient] = []
        self._next = itertools.count()
        self._guarded: set[trio.CancelScope] = set()
        self._failures = _FAILURES_TO_DOWN
        self._tenants: dict[bytes, tuple[Tenant, float]] = {}
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
            counters = await self._clients[0].stats(timeout_s=self.health_timeout_s)
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
    def probe_client(self) -> AsyncClient:
        return self.client("")

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

    async def tenant_of(self, api_key: str) -> Tenant:
        """The caller's tenant, cached by key digest; AuthError for a bad or revoked key."""
        digest = hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).digest()
        now = time.monotonic()
        hit = self._tenants.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        with self.guard():
            tenant = await self.client(api_key).whoami(timeout_s=min(self.timeout_s, 10.0))
        if len(self._tenants) >= _MAX_CACHED_TENANTS:
            self._tenants.clear()
        self._tenants[digest] = (tenant, now + self.tenant_cache_ttl_s)
        return tenant

    def forget_key(self, api_key: str) -> None:
        digest = hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).digest()
        self._tenants.pop(digest, None)
