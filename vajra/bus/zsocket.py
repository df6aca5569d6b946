"""The one Trio adapter over pyzmq sockets for actors (client sockets: :mod:`vajra.bus.client_socket`).

ZeroMQ exposes a single file descriptor per socket that is *edge-triggered*: it becomes
readable when the socket's event state changes, not while a message is waiting. So every
operation is tried non-blocking first, ``zmq.EVENTS`` is checked before sleeping, and at most
one task at a time waits on the descriptor. Any operation, by any task, may consume the edge
another task is waiting for; so after every operation the waiter is woken and re-checks
``zmq.EVENTS``. Two tasks sending and receiving on one DEALER therefore never stall.

Receiving drains in batches (:meth:`ZSocket.recv_batch`) so a busy actor pays for one wake-up
per batch rather than one per message.

Fairness: every :meth:`~ZSocket.recv_batch` and :meth:`~ZSocket.send_each` yields to the
scheduler once (a full checkpoint) before it touches the socket, even when messages are
waiting or the socket has room. Without that, a task fed faster than it drains would never
yield, and an actor's other tasks (tickers, heartbeats, deadlines) would starve.

Cancellation: a cancelled ``send``/``recv`` leaves the socket usable; a message is either
fully sent/received or not at all (ZeroMQ messages are atomic).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import trio
import zmq

# Plain ints: combining pyzmq's IntFlag members builds new enum objects, slowly, per call.
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)

#: Socket types for :func:`open_socket`; actors name them from here, never from pyzmq.
ROUTER = int(zmq.ROUTER)
DEALER = int(zmq.DEALER)
PUB = int(zmq.PUB)
SUB = int(zmq.SUB)

#: What :func:`new_context` returns; actors hold one and pass it to :func:`open_socket`.
Context = zmq.Context


class ActorContext(zmq.Context[Any]):
    """A context that the garbage collector can finalise without blocking the process.

    pyzmq's ``Context.__del__`` closes the sockets it still knows and then terminates the
    context, which blocks until every socket is closed. It knows its sockets by weak reference,
    and the collector clears those before finalising a reference cycle, so a context collected
    together with its open sockets (an actor or a client that was never closed, or whose test
    failed) waits forever, on whatever thread happened to trigger the collection. This context
    holds every socket made on it (monitors included) and closes them before it terminates.
    Every context in Vajra is one of these.
    """

    # pyzmq routes attribute writes to socket options unless the class declares the name.
    _vajra_sockets: list[zmq.Socket[Any]] | None = None

    def socket(
        self,
        socket_type: int,
        socket_class: Callable[[ActorContext, int], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        sock = super().socket(socket_type, socket_class, **kwargs)
        # Kept until this context goes away; sockets already closed are dropped here.
        self._vajra_sockets = [s for s in self._vajra_sockets or () if not s.closed] + [sock]
        return sock

    def __del__(self) -> None:
        for sock in self._vajra_sockets or ():
            if not sock.closed:
                sock.close(linger=0)
        self._vajra_sockets = None
        super().__del__()


def new_context(io_threads: int = 1) -> zmq.Context[Any]:
    """A ZeroMQ context (one per actor process, one per client connection), one I/O thread."""
    return ActorContext(io_threads=io_threads)


class ZSocket:
    """A pyzmq socket used from Trio tasks. Create with :func:`open_socket`.

    Not thread-safe (no ZeroMQ socket is): use it from one Trio run only.
    """

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._sock = sock
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._lot = trio.lowlevel.ParkingLot()
        self._waiter: trio.CancelScope | None = None
        self._want = 0  # the events the waiting tasks wait for
        self.closed = False

    @property
    def raw(self) -> zmq.Socket[Any]:
        return self._sock

    def bind(self, address: str) -> str:
        """Bind and return the concrete address (a ``:0`` TCP port is resolved)."""
        if address.startswith("tcp://") and address.endswith(":0"):
            port = self._sock.bind_to_random_port(address[: -len(":0")])
            return f"{address[: -len(':0')]}:{port}"
        self._sock.bind(address)
        endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT)
        return endpoint.decode() if isinstance(endpoint, bytes) else address

    def connect(self, address: str) -> None:
        self._sock.connect(address)

    def subscribe(self, prefix: bytes = b"") -> None:
        self._sock.setsockopt(zmq.SUBSCRIBE, prefix)

    def _events(self) -> int:
        return cast(int, self._sock.getsockopt(_EVENTS))

    def _woke(self) -> None:
        """Called after every operation: the edge a waiter sleeps on may have been consumed.

        The waiter is woken only when what it waits for is already available; otherwise
        the next change of state raises a fresh edge and wakes it anyway.
        """
        if self._waiter is not None and self._events() & self._want:
            self._waiter.cancel()

    async def _wait(self, flag: int) -> None:
        while not (self._events() & flag):
            if self.closed:
                raise trio.ClosedResourceError("socket was closed")
            self._want |= flag
            if self._waiter is None:
                with trio.CancelScope() as scope:
                    self._waiter = scope
                    try:
                        await trio.lowlevel.wait_readable(self._fd)
                    finally:
                        self._waiter = None
                        self._want = 0
                        self._lot.unpark_all()
            else:
                await self._lot.park()

    def _send_parts(self, frames: Sequence[bytes]) -> None:
        """Send all parts or raise zmq.Again before the first (ZeroMQ messages are atomic)."""
        send = self._sock.send
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            send(frame, _NOBLOCK if i == last else _MORE_NOBLOCK, copy=True)

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send one multipart message, waiting while the socket is at its high-water mark."""
        await self.send_each((frames,))

    async def send_each(self, messages: Sequence[Sequence[bytes]]) -> None:
        """Send several multipart messages in order, each its own ZeroMQ message.

        Cheaper than one :meth:`send` each: the waiter is checked once, at the end.
        Yields once before sending (see the module docstring), so a cancellation there sends
        nothing.
        """
        await trio.lowlevel.checkpoint()
        for frames in messages:
            while True:
                try:
                    self._send_parts(frames)
                    break
                except zmq.Again:
                    self._woke()  # the sends so far may have consumed another task's edge
                    await self._wait(_POLLOUT)
        self._woke()

    def send_nowait(self, frames: Sequence[bytes]) -> bool:
        """Try to send without waiting; False if the socket would block (message not sent)."""
        try:
            self._send_parts(frames)
        except zmq.Again:
            return False
        self._woke()
        return True

    def _recv_parts(self) -> list[bytes]:
        """Take one whole message or raise zmq.Again (its later frames are always there).

        ``Frame.more`` is read instead of asking the socket for ``RCVMORE`` per frame.
        """
        recv = self._sock.recv
        frame = recv(_NOBLOCK, copy=False)
        parts = [frame.bytes]
        while frame.more:
            frame = recv(_NOBLOCK, copy=False)
            parts.append(frame.bytes)
        return parts

    async def recv(self) -> list[bytes]:
        """Receive one multipart message."""
        return (await self.recv_batch(1))[0]

    async def recv_batch(self, max_messages: int = 256) -> list[list[bytes]]:
        """Wait for at least one message, then take every waiting one, up to ``max_messages``.

        Yields once before receiving (see the module docstring), so a cancellation there
        loses no message.
        """
        await trio.lowlevel.checkpoint()
        while True:
            try:
                batch = [self._recv_parts()]
                break
            except zmq.Again:
                await self._wait(_POLLIN)
        while len(batch) < max_messages:
            try:
                batch.append(self._recv_parts())
            except zmq.Again:
                break
        self._woke()
        return batch

    def close(self, linger_ms: int = 0) -> None:
        """Close now; what is still queued to send is dropped, or with ``linger_ms`` sent for
        at most that long by the context's I/O thread (until the context is terminated)."""
        if self.closed:
            return
        self.closed = True
        try:
            trio.lowlevel.notify_closing(self._fd)
        except RuntimeError:  # closed outside a Trio run: nobody can be waiting
            pass
        if self._waiter is not None:
            self._waiter.cancel()
        self._lot.unpark_all()
        self._sock.close(linger=linger_ms)


def open_socket(
    ctx: zmq.Context[Any],
    socket_type: int,
    *,
    identity: bytes | None = None,
    high_water_mark: int = 10_000,
    max_message_bytes: int | None = None,
    linger_ms: int = 0,
    handover: bool = False,
) -> ZSocket:
    """Create a socket with Vajra's defaults: bounded queues, no linger, optional size cap.

    ``max_message_bytes`` makes ZeroMQ drop any peer that sends a larger message, before it
    is ever buffered in full. ``handover`` (ROUTER only) lets a restarted peer take over its
    identity at once; never set it on a client-facing socket, where it would let one client
    claim another's identity.
    """
    sock = ctx.socket(socket_type)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.SNDHWM, high_water_mark)
    sock.setsockopt(zmq.RCVHWM, high_water_mark)
    sock.setsockopt(zmq.LINGER, linger_ms)
    if max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    if socket_type == zmq.ROUTER:
        # Replies to a peer that went away are dropped rather than raising.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1 if handover else 0)
    return ZSocket(sock)
