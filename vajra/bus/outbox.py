"""Messages gathered per peer and sent as one ZeroMQ message: the batching of internal hops.

Handing a message to ZeroMQ's I/O thread and waking the peer's event loop cost far more than
encoding it. So on the internal hops (gateway → scheduler → executor → gateway) an actor adds
what one pass of its loop produced to an :class:`Outbox` and flushes once at the end of the
pass: every peer gets one ZeroMQ message carrying its messages back to back, which the peer
takes apart with :func:`vajra.bus.codec.decode_many`. Under light load a pass produces one
message and nothing waits; under heavy load the fixed costs are paid once per batch.

Client-facing sockets never batch: a client's ZeroMQ message is always exactly one message.

Order: messages to one peer leave in the order they were added, whichever task flushes
(one flush runs at a time). A flush cancelled while it waits at the high-water mark loses
the messages it held, as a cancelled send would.
"""

from __future__ import annotations

from collections.abc import Sequence

from vajra.bus.zsocket import ZSocket

#: Messages per ZeroMQ message at most; more are split into several ZeroMQ messages.
DEFAULT_MAX_MESSAGES = 256


class Outbox:
    """Messages waiting for one socket, per peer. ``add`` never blocks; ``flush`` sends.

    ``peer`` is the routing identity on a ROUTER socket and ``None`` on a DEALER.
    """

    def __init__(self, sock: ZSocket, *, max_messages: int = DEFAULT_MAX_MESSAGES) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self._sock = sock
        self._max = max_messages
        self._open: dict[bytes | None, tuple[list[bytes], list[int]]] = {}
        self._full: list[list[bytes]] = []
        self._flushing = False
        self.pending = 0  # messages added and not yet taken by a flush

    def add(self, frames: Sequence[bytes], peer: bytes | None = None) -> None:
        """Queue one encoded message (``[header, body, *bulk]``) for ``peer``."""
        entry = self._open.get(peer)
        if entry is None:
            entry = self._open[peer] = ([] if peer is None else [peer], [0])
        parts, count = entry
        parts.extend(frames)
        count[0] += 1
        self.pending += 1
        if count[0] >= self._max:
            self._full.append(parts)
            del self._open[peer]

    async def flush(self) -> None:
        """Send everything added so far, one ZeroMQ message per peer (waits at the HWM).

        Returns at once, without a checkpoint, when nothing is waiting. When another task is
        already flushing (waiting at the high-water mark), that task sends what was added
        here too, after what it holds, and this call returns at once.
        """
        if self._flushing:
            return
        self._flushing = True
        try:
            while self.pending:
                ready, self._full = self._full, []
                ready.extend(parts for parts, _ in self._open.values())
                self._open = {}
                self.pending = 0
                for parts in ready:
                    await self._sock.send(parts)
        finally:
            self._flushing = False
