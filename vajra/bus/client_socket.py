"""The client side of a connection to a gateway: a DEALER and a monitor of its connection.

Two flavours over the same socket setup (bounded queues, no linger):

- :class:`DealerConnection`, for Trio, built on :class:`~vajra.bus.zsocket.ZSocket`; open it
  with :func:`connect_dealer`. :meth:`~DealerConnection.next_disconnect` returns each time the
  connection to the gateway drops, so a client can fail its outstanding calls at once
  instead of leaving them to their deadlines.
- :class:`BlockingDealer`, for blocking code (one thread per socket: no ZeroMQ socket is
  thread-safe), made by a :class:`BlockingContext`; waits are pyzmq polls bounded by a
  ``time.monotonic()`` deadline, and :meth:`~BlockingDealer.receive` reports a dropped
  connection alongside whatever message came.

ZeroMQ reconnects by itself: after a drop, later sends go to whatever listens at the address.
A malformed or unsupported address is refused when connecting, with :class:`ValueError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from vajra.bus.zsocket import ZSocket, new_context, open_socket

#: Messages either way a client's socket queues before sends wait (and receives drop).
HIGH_WATER_MARK = 10_000
_MONITOR_BATCH = 64


def _is_disconnect(frames: Sequence[bytes]) -> bool:
    """Whether a socket-monitor message reports a dropped connection (False if unparsable)."""
    try:
        event = parse_monitor_message(list(frames))["event"]
    except (ValueError, KeyError, IndexError):  # not an event we understand
        return False
    return bool(event == zmq.EVENT_DISCONNECTED)


def _connect(sock: zmq.Socket[Any], address: str) -> None:
    """Connect ``sock`` or close it and raise ValueError naming the address."""
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ValueError(f"cannot connect to {address!r}: {exc}") from None


# --- Trio ------------------------------------------------------------------------------------


class DealerConnection:
    """A DEALER connected to one address, used from Trio, with a monitor of its connection.

    Owns its own ZeroMQ context (one I/O thread), so closing it releases everything. Use it
    from one Trio run; one task at a time may wait in :meth:`next_disconnect`.
    """

    def __init__(self, ctx: zmq.Context[Any], sock: ZSocket, monitor: ZSocket) -> None:
        self._ctx = ctx
        self._sock = sock
        self._monitor = monitor
        self._drops = 0  # reported by the monitor, not yet returned by next_disconnect

    async def send(self, frames: Sequence[bytes]) -> None:
        """Send one message, waiting while the queue is full.

        Raises ``trio.ClosedResourceError`` when the connection is closed meanwhile.
        """
        await self._sock.send(frames)

    def try_send(self, frames: Sequence[bytes]) -> bool:
        """Send without waiting; False when the queue is full or the socket is closing.

        Never blocks and never raises: for messages whose loss is tolerable (a cancel, say).
        """
        try:
            return self._sock.send_nowait(frames)
        except (zmq.ZMQError, trio.ClosedResourceError):
            return False

    async def recv_batch(self, max_messages: int) -> list[list[bytes]]:
        """Wait for at least one message, then take up to ``max_messages`` waiting ones."""
        return await self._sock.recv_batch(max_messages)

    async def next_disconnect(self) -> None:
        """Return when the connection to the gateway next drops (once per drop)."""
        while not self._drops:
            for frames in await self._monitor.recv_batch(_MONITOR_BATCH):
                if _is_disconnect(frames):
                    self._drops += 1
        self._drops -= 1

    def close(self) -> None:
        """Close the monitor, the socket and the context; waiting tasks get ClosedResourceError."""
        self._monitor.close()
        self._sock.close()
        self._ctx.term()  # returns at once: both sockets are closed with linger 0


def connect_dealer(address: str) -> DealerConnection:
    """A :class:`DealerConnection` to ``address`` (ValueError when it cannot be connected to)."""
    ctx: zmq.Context[Any] = new_context()
    sock = open_socket(ctx, zmq.DEALER, high_water_mark=HIGH_WATER_MARK)
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:
        sock.close()
        ctx.term()
        raise ValueError(f"cannot connect to {address!r}: {exc}") from None
    monitor = ZSocket(sock.raw.get_monitor_socket(zmq.EVENT_DISCONNECTED))
    return DealerConnection(ctx, sock, monitor)


# --- blocking code ---------------------------------------------------------------------------


def _poll_ms(deadline: float) -> int:
    """Milliseconds to ``deadline`` (a ``time.monotonic()`` value), at least 1."""
    return max(1, math.ceil((deadline - time.monotonic()) * 1000))


class BlockingDealer:
    """A DEALER connected to one address, used from one thread at a time with blocking waits.

    Made by :meth:`BlockingContext.dealer`. With ``monitored``, :meth:`receive` also reports
    when the connection to the gateway drops.
    """

    def __init__(self, sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes] | None) -> None:
        self._sock = sock
        self._monitor = monitor
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            self._poller.register(monitor, zmq.POLLIN)

    def send(self, frames: Sequence[bytes], deadline: float | None = None) -> bool:
        """Send one message, waiting while the queue is full until ``deadline``.

        ``deadline`` is a ``time.monotonic()`` value, or None to wait as long as it takes.
        False (and nothing sent) when the deadline passed first.
        """
        if deadline is None:
            self._sock.send_multipart(frames)
            return True
        while True:
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
                return True
            except zmq.Again:
                if time.monotonic() >= deadline:
                    return False
                self._sock.poll(_poll_ms(deadline), zmq.POLLOUT)

    def try_send(self, frames: Sequence[bytes]) -> bool:
        """Send without waiting; False when the queue is full or the socket is closed.

        Never blocks and never raises: for messages whose loss is tolerable (a cancel, say).
        """
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def receive(self, deadline: float) -> tuple[list[bytes] | None, bool]:
        """Wait for one message until ``deadline`` (a ``time.monotonic()`` value).

        Returns ``(message, dropped)``: the message, or None when the deadline passed or the
        connection dropped first; ``dropped`` is True when the monitor reported a dropped
        connection during this wait.
        """
        while True:
            ready = dict(self._poller.poll(_poll_ms(deadline)))
            dropped = self._monitor is not None and self._monitor in ready and self._read_drop()
            if self._sock in ready:
                try:
                    return self._sock.recv_multipart(zmq.NOBLOCK), dropped
                except zmq.Again:
                    pass
            if dropped or time.monotonic() >= deadline:
                return None, dropped

    def recv_nowait(self) -> list[bytes] | None:
        """One waiting message, or None when none is waiting."""
        try:
            return self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None

    def _read_drop(self) -> bool:
        assert self._monitor is not None
        try:
            frames = self._monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return False
        return _is_disconnect(frames)

    def close(self) -> None:
        """Close the socket and its monitor (idempotent)."""
        if self._monitor is not None:
            self._monitor.close(linger=0)
        self._sock.close(linger=0)


class BlockingContext:
    """One ZeroMQ context from which blocking code opens its DEALERs (one per thread).

    :meth:`close` closes the context and every socket still open on it.
    """

    def __init__(self) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = new_context()

    def dealer(self, address: str, *, monitored: bool = True) -> BlockingDealer:
        """A :class:`BlockingDealer` connected to ``address`` (ValueError if it cannot be)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
        sock.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
        _connect(sock, address)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED) if monitored else None
        return BlockingDealer(sock, monitor)

    def close(self) -> None:
        """Close every socket still open on the context, then the context itself."""
        self._ctx.destroy(linger=0)
