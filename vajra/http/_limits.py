"""The request body's limits: its size, and how long it may take to arrive.

Per-tenant rate and concurrency limits are not here: the gateway applies them to every client,
ZeroMQ or HTTP (:mod:`vajra.policies.limits`); the bridge only turns its refusals into 429.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import trio
from fastapi import HTTPException

from vajra.http._errors import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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


class BodyTooSlow(HTTPException):
    """Raised from ``receive`` when the body has not arrived whole within its time."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s")


class BodySizeLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413 (``payload_too_large``), and
    bodies that take longer than ``timeout_s`` to arrive with 408 (a slow client holding a
    connection open, one byte at a time, must not hold it for long).

    A declared ``Content-Length`` over the limit is refused before the body is read; a body
    that turns out longer than the limit fails its read with :class:`BodyTooLarge`.
    ``per_path`` gives some exact paths (adapter uploads) a limit of their own, and
    ``per_pattern`` some path patterns (regular expressions of the server's own routes, matched
    whole; a training job's dataset) one of their own. The time limit
    covers reading the body only: once its last part arrived, ``receive`` (which a streaming
    response uses to notice a disconnect) waits as long as it must.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        render: Callable[[ApiError, str], Any],
        per_path: Mapping[str, int] | None = None,
        per_pattern: Mapping[str, int] | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.app = app
        self.default_max_bytes = max_bytes
        self.render = render
        self.per_path = dict(per_path or {})
        self.per_pattern = [(re.compile(p), n) for p, n in (per_pattern or {}).items()]
        self.timeout_s = timeout_s

    def limit(self, path: str) -> int:
        """The most bytes a body sent to ``path`` may hold."""
        if (exact := self.per_path.get(path)) is not None:
            return exact
        for pattern, n in self.per_pattern:
            if pattern.fullmatch(path):
                return n
        return self.default_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.limit(scope.get("path", ""))
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
        complete = False
        deadline = trio.current_time() + self.timeout_s

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:
                return await receive()
            with trio.move_on_at(deadline):
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > max_bytes:
                        raise BodyTooLarge(max_bytes)
                    complete = not message.get("more_body", False)
                else:
                    complete = True
                return message
            raise BodyTooSlow(self.timeout_s)

        await self.app(scope, limited, send)
