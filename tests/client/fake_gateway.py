"""A fake gateway for the client tests: a ROUTER that answers by the client protocol, served
in the test's Trio run or (:func:`gateway_in_thread`) in a thread of its own.

What it answers depends on the prompt:

- ``"!auth"``, ``"!overload"``, ``"!invalid"`` (field ``max_tokens``), ``"!code:<code>"``:
  an ``ErrorReply`` with that error code;
- ``"!silent"``: never answers;
- ``"!delay:<ms>"``: the normal answer, after ``ms`` milliseconds;
- ``"!garbage"``: junk frames, an ``ErrorReply`` for request ``""``, a result for an unknown
  request, then the normal answer;
- ``"!badreply"``: a ``result`` frame for this request that lacks required fields;
- ``"!flood"`` (streams): far more chunks than ``max_tokens`` allows;
- anything else: ``"echo: <prompt>"``; streams get one chunk per word. Every answer waits a
  random 0-10 ms first, so replies to concurrent requests go out in shuffled order.

``StatsRequest`` is answered with ``StatsReply(actor="gateway", counters={"requests": n})``.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import trio

from vajra.bus.codec import DecodeError, decode, encode
from vajra.bus.messages import (
    PROTOCOL_VERSION,
    CancelRequest,
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    StatsReply,
    StatsRequest,
    TokenChunk,
)
from vajra.bus.zsocket import ROUTER, Context, ZSocket, new_context, open_socket
from vajra.errors import RETRIABLE_CODES, ErrorCode

ERROR_PROMPTS = {
    "!auth": (ErrorCode.AUTH_FAILED, None),
    "!overload": (ErrorCode.OVERLOADED, None),
    "!invalid": (ErrorCode.INVALID_REQUEST, "max_tokens"),
}


def echo_text(prompt: str) -> str:
    return f"echo: {prompt}"


def echo_pieces(prompt: str) -> list[str]:
    """The chunks a stream of ``prompt`` is sent as: one per word, spaces kept."""
    words = echo_text(prompt).split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


class FakeGateway:
    def __init__(self, ctx: Context[Any], seed: int = 0) -> None:
        self._ctx = ctx
        self._rng = random.Random(seed)
        self.address = ""
        self.requests: list[InferRequest] = []
        self.peers: set[bytes] = set()
        self.reply_order: list[str] = []
        self.stats_requests = 0
        self.request_seen = trio.Event()
        self.cancels: list[CancelRequest] = []
        self.cancel_seen = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        sock = open_socket(self._ctx, ROUTER)
        try:
            self.address = sock.bind("tcp://127.0.0.1:0")
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                while True:
                    for ident, *frames in await sock.recv_batch():
                        try:
                            message = decode(frames).message
                        except DecodeError as exc:
                            reply = ErrorReply(exc.request_id, exc.code.value, exc.message)
                            await sock.send([ident, *encode(reply)])
                            continue
                        self.peers.add(ident)
                        nursery.start_soon(self._answer, sock, ident, message)
        finally:
            sock.close()

    async def _answer(self, sock: ZSocket, ident: bytes, message: Message) -> None:
        async def send(reply: Message) -> None:
            await sock.send([ident, *encode(reply)])

        if isinstance(message, StatsRequest):
            self.stats_requests += 1
            counters = {"requests": len(self.requests), "stats": self.stats_requests}
            await send(StatsReply(message.request_id, "gateway", counters))
            return
        if isinstance(message, CancelRequest):  # one-way, as the real gateway's
            self.cancels.append(message)
            self.cancel_seen.set()
            return
        assert isinstance(message, InferRequest)
        self.requests.append(message)
        self.request_seen.set()
        rid, prompt = message.request_id, message.prompt
        if prompt == "!silent":
            return
        if prompt in ERROR_PROMPTS or prompt.startswith("!code:"):
            code, field = ERROR_PROMPTS.get(prompt, (prompt.removeprefix("!code:"), None))
            retriable = code in RETRIABLE_CODES
            await send(ErrorReply(rid, str(code), f"fake {code}", field, retriable))
            return
        if prompt.startswith("!delay:"):
            await trio.sleep(int(prompt.removeprefix("!delay:")) / 1000)
        else:
            await trio.sleep(self._rng.uniform(0, 0.01))
        if prompt == "!garbage":
            await sock.send([ident, b"\xc1not msgpack", b"junk"])
            await sock.send([ident, b"one frame only"])
            await sock.send([ident, msgpack.packb([PROTOCOL_VERSION, "nope", "", None, None]), b""])
            await send(ErrorReply("", "malformed_frame", "could not parse your frame"))
            await send(ErrorReply("0" * 32, "internal", "for nobody"))
            await send(InferResult("f" * 32, "stray", [], "stop", 1, 1, 0.1))
        if prompt == "!badreply":
            header = msgpack.packb([PROTOCOL_VERSION, "result", rid, None, None])
            await sock.send([ident, header, msgpack.packb({"request_id": rid, "text": 5})])
            return
        text = echo_text(prompt)
        pieces = echo_pieces(prompt)
        if message.stream:
            if prompt == "!flood":
                pieces = ["x"] * (message.sampling.max_tokens + 100)
            for i, piece in enumerate(pieces):
                await send(TokenChunk(rid, i, piece, [i]))
                if i % 2:
                    await trio.lowlevel.checkpoint()
        self.reply_order.append(rid)
        await send(
            InferResult(
                request_id=rid,
                text=text,
                token_ids=list(range(len(pieces))),
                finish_reason="stop",
                prompt_tokens=len(prompt.split()),
                completion_tokens=len(pieces),
                gpu_ms=1.5,
                executor_id="exec-fake",
                queue_ms=0.5,
            )
        )


@contextmanager
def gateway_in_thread() -> Iterator[tuple[FakeGateway, Callable[[], None]]]:
    """A fake gateway served by its own ``trio.run`` in a background thread, and a function
    that stops it (closing its socket, as a killed gateway's would be)."""
    ctx: Context[Any] = new_context()
    gw = FakeGateway(ctx)
    started: queue.Queue[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.run)
            started.put((trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(serve,), name="fake-gateway", daemon=True)
    thread.start()
    token, scope = started.get(timeout=5)

    def stop() -> None:
        if thread.is_alive():
            trio.from_thread.run_sync(scope.cancel, trio_token=token)
            thread.join(timeout=5)
        assert not thread.is_alive(), "the fake gateway thread did not stop"

    try:
        yield gw, stop
    finally:
        stop()
        ctx.term()
