"""Per-tenant limits in the bridge, and the request body size limit.

:class:`TenantLimits` is plain logic with an injected clock: a token bucket per tenant
(``rate_per_s`` refill, ``burst`` capacity) and a count of the tenant's requests in flight
(streams count until their last event). Going over either raises a 429 :class:`ApiError`
with ``Retry-After``. One bridge process enforces its own budget; N bridges behind a load
balancer allow N times the rate (documented; the gateway's ``max_inflight`` is the global cap).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import trio
from fastapi import HTTPException

from vajra.http._errors import ApiError, rate_limited

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    inflight: int = 0


class TenantLimits:
    """Token-bucket rate and concurrency limits per tenant id; see the module docstring."""

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        max_concurrent: int,
        clock: Callable[[], float] = time.monotonic,
        max_tenants: int = 100_000,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1, burst)
        self.max_concurrent = max_concurrent
        self._clock = clock
        self._max_tenants = max_tenants
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, tenant_id: str, now: float) -> _Bucket:
        b = self._buckets.get(tenant_id)
        if b is None:
            if len(self._buckets) >= self._max_tenants:
                self._prune(now)
            b = self._buckets[tenant_id] = _Bucket(float(self.burst), now)
        else:
            b.tokens = min(float(self.burst), b.tokens + (now - b.updated) * self.rate_per_s)
            b.updated = now
        return b

    def _prune(self, now: float) -> None:
        """Forget idle tenants whose buckets would be full by now (they lose nothing)."""
        for tenant_id, b in list(self._buckets.items()):
            full = b.tokens + (now - b.updated) * self.rate_per_s >= self.burst
            if b.inflight == 0 and full:
                del self._buckets[tenant_id]

    def acquire(self, tenant_id: str) -> None:
        """Admit one request of ``tenant_id`` or raise a 429 ApiError; pair with release."""
        now = self._clock()
        b = self._bucket(tenant_id, now)
        if b.inflight >= self.max_concurrent:
            raise rate_limited(
                "concurrency_limited",
                f"more than {self.max_concurrent} requests of this tenant in flight",
                1.0,
            )
        if b.tokens < 1.0:
            wait = (1.0 - b.tokens) / self.rate_per_s if self.rate_per_s > 0 else 60.0
            raise rate_limited(
                "rate_limited", f"over {self.rate_per_s:g} requests per second", wait
            )
        b.tokens -= 1.0
        b.inflight += 1

    def release(self, tenant_id: str) -> None:
        b = self._buckets.get(tenant_id)
        if b is not None and b.inflight > 0:
            b.inflight -= 1

    @contextmanager
    def slot(self, tenant_id: str) -> Iterator[None]:
        self.acquire(tenant_id)
        try:
            yield
        finally:
            self.release(tenant_id)

    def inflight(self, tenant_id: str) -> int:
        b = self._buckets.get(tenant_id)
        return 0 if b is None else b.inflight


#: A refused body up to this size is read and dropped before the 413 is sent, so a client
#: still sending it reads the answer instead of a reset connection; a larger one is not read
#: (the connection is closed after the answer).
DRAIN_MAX_BYTES = 4 << 20
_DRAIN_TIMEOUT_S = 5.0


async def _drain(receive: Receive) -> None:
    with trio.move_on_after(_DRAIN_TIMEOUT_S):
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body without a (truthful) Content-Length grows too big."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


class BodySizeLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413 (``payload_too_large``).

    A declared ``Content-Length`` over the limit is refused before the body is read; a body
    that turns out longer than the limit fails its read with :class:`BodyTooLarge`.
    ``per_path`` gives some exact paths (adapter uploads) a limit of their own.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        render: Callable[[ApiError, str], Any],
        per_path: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.default_max_bytes = max_bytes
        self.render = render
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.per_path.get(scope.get("path", ""), self.default_max_bytes)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > max_bytes:
                    err = ApiError(
                        413,
                        "payload_too_large",
                        f"the request body has {declared} bytes; the limit is {max_bytes}",
                    )
                    if declared <= DRAIN_MAX_BYTES:
                        await _drain(receive)
                    await self.render(err, scope.get("path", ""))(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise BodyTooLarge(max_bytes)
            return message

        await self.app(scope, limited, send)
