"""Server-sent-event answers (``"stream": true``) whose status is decided by the first event.

An error before any event (bad key, unknown adapter, limits, validation) is answered as a
normal JSON error with its status; an error after the stream started is sent as one
``data: {"error": …}`` event, and the stream ends. A client that disconnects cancels the
producer (the request is abandoned in the SDK, which cancels it at the gateway).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio
from starlette.responses import Response

from vajra.client import VajraError
from vajra.http._errors import ApiError, error_response, sse_error

log = logging.getLogger("vajra.http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Emit = Callable[[bytes], Awaitable[None]]

#: The last event of every stream.
DONE = b"data: [DONE]\n\n"


def sse(obj: object) -> bytes:
    """One ``data:`` event holding ``obj`` as compact JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class EventStream(Response):
    """A server-sent-event response whose status is decided by its first event.

    ``produce(emit)`` generates the events. If it fails before emitting, the failure is
    answered as an ordinary JSON error; after, as one error event. A client that disconnects
    cancels ``produce`` (the request is abandoned in the SDK).
    """

    media_type = "text/event-stream"

    def __init__(self, produce: Callable[[Emit], Awaitable[None]], *, openai: bool) -> None:
        self._produce = produce
        self._openai = openai
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        started = False
        failure: ApiError | None = None

        async def emit(data: bytes) -> None:
            nonlocal started
            if not started:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                started = True
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def produce(done: trio.CancelScope) -> None:
            nonlocal failure
            try:
                await self._produce(emit)
            except ApiError as exc:
                failure = exc
            except VajraError as exc:
                failure = ApiError.from_vajra(exc)
            except UnicodeEncodeError:
                failure = ApiError(400, "invalid_request", "text must be valid UTF-8")
            except Exception:
                log.exception("a stream failed")
                failure = ApiError(500, "internal", "internal error in the HTTP bridge")
            finally:
                done.cancel()

        async def until_disconnect(done: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            done.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, nursery.cancel_scope)
            nursery.start_soon(until_disconnect, nursery.cancel_scope)
        if failure is not None and not started:
            await error_response(failure, openai=self._openai)(scope, receive, send)
            return
        if not started:  # cancelled by a disconnect before the first event
            return
        if failure is not None:
            await send(
                {
                    "type": "http.response.body",
                    "body": sse_error(failure, openai=self._openai),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})
