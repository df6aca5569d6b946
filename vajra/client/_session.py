"""The Trio client's connection: one receive task, one bounded reply queue per request.

Data flows left to right::

    caller ──request frames──▶ DEALER ──▶ gateway
    gateway ──▶ DEALER ──▶ receive task ──(by request_id)──▶ the call's memory channel ──▶ caller

The receive task never waits on a caller: each request's queue is sized to the most replies
the protocol allows it, so one slow reader cannot stall the others; a gateway that sends more
fails that request with :class:`~vajra.errors.ProtocolError`. Replies for requests that are
no longer outstanding (timed out, abandoned, unknown, or frames that do not decode at all)
are counted in :attr:`Session.ignored`, logged at debug level and dropped.

A generation that is abandoned before its answer (its deadline passed, the caller was
cancelled, a stream left early) is cancelled at the gateway with a ``CancelRequest``, so its
executor stops computing (and billing) it. When the connection to the gateway drops (the
bus's connection monitor reports it), every outstanding call fails at once with a retriable
:class:`~vajra.errors.UnavailableError` instead of waiting out its deadline: whatever the
gateway held died with it. ZeroMQ reconnects by itself; later calls go to the new gateway.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import TypeVar

import trio

from vajra.bus.client_socket import DealerConnection, connect_dealer
from vajra.bus.messages import ErrorReply
from vajra.client._calls import Call
from vajra.client._replies import Reply, decode_reply, interpret_reply
from vajra.client._requests import Request, cancel_frames, reply_capacity, request_frames
from vajra.errors import InvalidRequest, ProtocolError, TimeoutError, UnavailableError, VajraError

log = logging.getLogger("vajra.client")

T = TypeVar("T")

_RECV_BATCH = 256


class Pending:
    """One outstanding request: the receive task feeds ``send``, the caller reads ``receive``.

    ``failure`` says why ``send`` was closed early (client closed, reply queue overflowed).
    """

    __slots__ = ("failure", "receive", "request_id", "send")

    def __init__(self, request_id: str, capacity: int) -> None:
        self.request_id = request_id
        self.send, self.receive = trio.open_memory_channel[Reply](capacity)
        self.failure: VajraError | None = None


@contextmanager
def within(deadline: float, request_id: str, timeout_s: float) -> Iterator[None]:
    """``trio.fail_at(deadline)`` with ``TooSlowError`` turned into Vajra's TimeoutError."""
    try:
        with trio.fail_at(deadline):
            yield
    except trio.TooSlowError:
        raise TimeoutError(f"no answer to request {request_id} within {timeout_s:g} s") from None


class Session:
    """One connection to a gateway and the requests outstanding on it.

    :meth:`open` connects and starts the receive task and the connection watcher in the
    session's own nursery; :meth:`close` cancels them, fails every request still outstanding
    with :class:`~vajra.errors.UnavailableError` and closes the connection. Any number of
    tasks may run calls at once.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self._conn: DealerConnection | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._pending: dict[str, Pending] = {}
        self._opened = False
        self._closed = False
        self.ignored = 0  # replies no outstanding request could take
        self.disconnects = 0  # times the connection to the gateway dropped
        self.cancels_sent = 0  # abandoned generations cancelled at the gateway

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        if self._opened:
            raise RuntimeError("an AsyncClient can be opened only once")
        self._opened = True
        try:
            self._conn = connect_dealer(self.address)
        except ValueError as exc:
            self._shutdown()
            raise InvalidRequest(str(exc), field="address") from None
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._receive_loop, self._conn)
        self._nursery.start_soon(self._watch_connection, self._conn)

    async def close(self) -> None:
        assert self._nursery is not None and self._nursery_manager is not None
        self._nursery.cancel_scope.cancel()
        try:
            # The body's own exception is not handed to the nursery, so it propagates as it
            # is (not wrapped in an ExceptionGroup); only a crash of the receive task would.
            await self._nursery_manager.__aexit__(None, None, None)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        for pending in list(self._pending.values()):
            self._fail(pending, UnavailableError("the client was closed before the answer came"))
        if self._conn is not None:
            self._conn.close()

    def _open_connection(self) -> DealerConnection:
        if self._closed:
            raise UnavailableError("the client is closed")
        if self._conn is None:
            raise RuntimeError("open the client first: `async with AsyncClient(...) as client`")
        return self._conn

    # --- the receive side ----------------------------------------------------------------

    async def _receive_loop(self, conn: DealerConnection) -> None:
        """Owns the socket's receive side; dispatches every reply. Runs until cancelled."""
        while True:
            for frames in await conn.recv_batch(_RECV_BATCH):
                self._dispatch(frames)

    async def _watch_connection(self, conn: DealerConnection) -> None:
        """Fail every outstanding call when the connection to the gateway drops."""
        while True:
            await conn.next_disconnect()
            self.disconnects += 1
            lost = UnavailableError(
                "the connection to the gateway was lost before the answer came; retry"
            )
            for pending in list(self._pending.values()):
                self._fail(pending, lost)

    def _dispatch(self, frames: Sequence[bytes]) -> None:
        request_id, reply = decode_reply(frames)
        pending = self._pending.get(request_id)
        if pending is None:
            self.ignored += 1
            log.debug("ignoring a reply for no outstanding request (%r): %r", request_id, reply)
            return
        try:
            pending.send.send_nowait(reply)
        except trio.WouldBlock:
            self._fail(
                pending, ProtocolError(f"request {request_id} got more replies than it can have")
            )
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._pending.pop(request_id, None)

    def _fail(self, pending: Pending, error: VajraError) -> None:
        """End ``pending`` early: its reader drains what came, then gets ``error``."""
        if self._pending.get(pending.request_id) is pending:
            del self._pending[pending.request_id]
        if pending.failure is None:
            pending.failure = error
        pending.send.close()

    # --- one call --------------------------------------------------------------------------

    @contextmanager
    def register(self, request: Request) -> Iterator[Pending]:
        """Make ``request`` outstanding (before it is sent); forget it on the way out."""
        self._open_connection()
        rid = request.request_id
        if rid in self._pending:
            raise RuntimeError(f"request id {rid} is already outstanding")
        pending = Pending(rid, reply_capacity(request))
        self._pending[rid] = pending
        try:
            yield pending
        finally:
            if self._pending.get(rid) is pending:
                del self._pending[rid]
            pending.send.close()
            pending.receive.close()

    async def send(self, request: Request, bulk: Sequence[bytes] = ()) -> None:
        conn = self._open_connection()
        try:
            await conn.send(request_frames(request, bulk))
        except trio.ClosedResourceError:
            raise UnavailableError("the client was closed while sending") from None

    @staticmethod
    async def next_reply(pending: Pending) -> Reply:
        try:
            return await pending.receive.receive()
        except trio.EndOfChannel:
            return pending.failure or UnavailableError("the request was abandoned")

    @staticmethod
    async def next_reply_before(pending: Pending, deadline: float, timeout_s: float) -> Reply:
        """:meth:`next_reply` under ``deadline`` (Vajra's TimeoutError once it passed).

        A stream reads one reply per chunk, so this is its per-token cost: a reply already
        waiting is taken after one checkpoint, and a wait runs under one plain cancel scope
        (``within``'s generator-based context managers cost more than the rest of a chunk).
        """
        await trio.lowlevel.checkpoint()
        if trio.current_time() < deadline:
            try:
                return pending.receive.receive_nowait()
            except trio.WouldBlock:
                pass
            except trio.EndOfChannel:
                return pending.failure or UnavailableError("the request was abandoned")
            with trio.CancelScope(deadline=deadline):
                return await Session.next_reply(pending)
        raise TimeoutError(f"no answer to request {pending.request_id} within {timeout_s:g} s")

    def cancel(self, request: Request) -> None:
        """Tell the gateway that ``request`` was abandoned (never blocks, never raises)."""
        frames = cancel_frames(request)
        if frames is None or self._closed or self._conn is None:
            return
        # A full or closing socket drops it: the gateway's deadline still ends the request.
        if self._conn.try_send(frames):
            self.cancels_sent += 1

    async def run(self, call: Call[T]) -> T:
        """Send ``call``'s request and return its final answer as the call's value.

        Leaving without that answer (deadline, cancellation, a local failure) cancels it.
        """
        request, timeout_s = call.request, call.timeout_s
        deadline = trio.current_time() + timeout_s
        with self.register(request) as pending, within(deadline, request.request_id, timeout_s):
            await self.send(request, call.bulk)
            answered = False
            try:
                while True:
                    reply = await self.next_reply(pending)
                    answered = isinstance(reply, ErrorReply)
                    outcome = interpret_reply(reply)
                    if outcome is not None:
                        answered = True
                        return call.finish(outcome)
            finally:
                if not answered:
                    self.cancel(request)
