"""The gateway's client protocol: frames in from the client-facing ROUTER socket, one typed
message at a time to a handler, and every answer back out.

Every frame a client sends is answered: a reply, or an ``ErrorReply`` with a typed code. A
frame that does not decode is answered with the codec's typed error and counted
(``malformed_frames``); an exception the handler raises is answered too, a VajraError as
itself and anything else as ``internal`` plus a log line, so nothing a client sends can stop
the gateway. A send waits at the socket's high-water mark.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import trio

from vajra.actors.base import error_frames
from vajra.bus.codec import DecodeError, Envelope, decode, encode
from vajra.bus.messages import Message
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket
from vajra.config import VajraConfig
from vajra.errors import InternalError, UnavailableError, VajraError

log = logging.getLogger("vajra.gateway")

#: Handles one decoded message from the client with this routing identity.
Handler = Callable[[bytes, Envelope], Awaitable[None]]


class ClientProtocol:
    """The gateway's side of its client connections (one ROUTER socket, not owned here).

    ``out`` gathers replies produced during one pass (streamed chunks, results, cancels) and
    sends them in one go when flushed; single answers go out at once through :meth:`send`.
    """

    def __init__(self, cfg: VajraConfig, sock: ZSocket, counters: Counter[str]) -> None:
        self.cfg = cfg
        self.sock = sock
        self.counters = counters
        self.out = Outbox(sock, pack=False)  # a client's ZeroMQ message is one message

    async def serve(self, handle: Handler, end_pass: Callable[[], Awaitable[None]]) -> None:
        """Receive batches of client messages forever: ``handle`` each, then ``end_pass()``."""
        batch_size = self.cfg.bus.recv_batch
        while True:
            for frames in await self.sock.recv_batch(batch_size):
                try:
                    await self._receive(frames, handle)
                except VajraError as exc:
                    await self.reply_error(frames[0], "", exc)
                except Exception:  # a bug must cost one answer, never the gateway
                    log.exception("failed to handle a client message")
                    self.counters["internal_errors"] += 1
                    await self.reply_error(frames[0], "", InternalError("internal error"))
            await end_pass()

    async def _receive(self, frames: list[bytes], handle: Handler) -> None:
        identity = frames[0]
        try:
            env = decode(
                frames[1:],
                max_body_bytes=self.cfg.bus.max_body_bytes,
                max_bulk_bytes=self.cfg.adapters.max_adapter_bytes,
            )
        except DecodeError as exc:
            self.counters["malformed_frames"] += 1
            await self.reply_error(identity, exc.request_id or exc.message_id, exc)
            return
        await handle(identity, env)

    async def refuse_kind(self, identity: bytes, msg: Message) -> None:
        """Answer a well-formed message of a kind clients may not send (counted as malformed)."""
        self.counters["malformed_frames"] += 1
        await self.reply_error(
            identity,
            getattr(msg, "request_id", ""),
            DecodeError(f"the gateway does not accept {msg.KIND!r} messages", field="kind"),
        )

    async def send(self, identity: bytes, msg: Message) -> None:
        await self.sock.send([identity, *encode(msg)])

    async def reply_error(self, identity: bytes, request_id: str, exc: VajraError) -> None:
        self.counters[f"error_{exc.code.value}"] += 1
        await self.sock.send([identity, *error_frames(request_id, exc)])

    async def reply_with(
        self,
        identity: bytes,
        request_id: str,
        answer: Coroutine[Any, Any, Message],
        *,
        timeout_s: float = math.inf,
    ) -> None:
        """Send ``answer``'s reply, or the typed error it raised (a timeout: unavailable)."""
        try:
            with trio.fail_after(timeout_s):
                reply = await answer
        except VajraError as exc:
            await self.reply_error(identity, request_id, exc)
            return
        except trio.TooSlowError:
            await self.reply_error(
                identity, request_id, UnavailableError("cluster state is unreachable; retry")
            )
            return
        except Exception:  # a bug must cost one answer, never the gateway
            log.exception("failed to answer request %s", request_id[:64])
            self.counters["internal_errors"] += 1
            await self.reply_error(identity, request_id, InternalError("internal error"))
            return
        await self.send(identity, reply)
