"""Messages gathered per peer and sent as one ZeroMQ message: the batching of internal hops.

Handing a message to ZeroMQ's I/O thread and waking the peer's event loop cost far more than
encoding it. So on the internal hops (gateway → scheduler → executor → gateway) an actor adds
what one pass of its loop produced to an :class:`Outbox` and flushes once at the end of the
pass: every peer gets one ZeroMQ message carrying its messages (one batch frame), which the
peer takes apart with :func:`vajra.bus.codec.decode_many`. Under light load a pass produces one
message and nothing waits; under heavy load the fixed costs are paid once per batch.

Client-facing sockets never pack: a client's ZeroMQ message is always exactly one message.
An outbox made with ``pack=False`` still gathers a pass's replies and sends them in one go
(:meth:`vajra.bus.zsocket.ZSocket.send_each`), each its own ZeroMQ message.

Order: messages to one peer leave in the order they were added, whichever task flushes
(one flush runs at a time). A flush cancelled while it waits at the high-water mark loses
the messages it held, as a cancelled send would.
"""

from __future__ import annotations

from collections.abc import Sequence

from vajra.bus.codec import pack_batch
from vajra.bus.zsocket import ZSocket

#: Messages per ZeroMQ message at most; more are split into several ZeroMQ messages.
DEFAULT_MAX_MESSAGES = 256


class Outbox:
    """Messages waiting for one socket, per peer. ``add`` never blocks; ``flush`` sends.

    ``peer`` is the routing identity on a ROUTER socket and ``None`` on a DEALER.
    ``pack``: several messages for one peer travel as one batch frame (internal hops only).
    """

    def __init__(
        self, sock: ZSocket, *, max_messages: int = DEFAULT_MAX_MESSAGES, pack: bool = True
    ) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self._sock = sock
        self._max = max_messages
        self._pack = pack
        self._open: dict[bytes | None, list[list[bytes]]] = {}
        self._full: list[tuple[bytes | None, list[list[bytes]]]] = []
        self._flushing = False
        self.pending = 0  # messages added and not yet taken by a flush

    def add(self, frames: Sequence[bytes], peer: bytes | None = None) -> None:
        """Queue one encoded message (``[header, body, *bulk]``) for ``peer``."""
        messages = self._open.get(peer)
        if messages is None:
            messages = self._open[peer] = []
        messages.append(list(frames))
        self.pending += 1
        if len(messages) >= self._max:
            self._full.append((peer, messages))
            del self._open[peer]

    async def flush(self) -> None:
        """Send everything added so far, one ZeroMQ message per peer (waits at the HWM).

        A peer with one message gets it as it is; several go as one batch frame
        (:func:`vajra.bus.codec.pack_batch`). Returns at once, without a checkpoint, when
        nothing is waiting. When another task is already flushing (waiting at the
        high-water mark), that task sends what was added here too, after what it holds,
        and this call returns at once.
        """
        if self._flushing:
            return
        self._flushing = True
        try:
            while self.pending:
                ready, self._full = self._full, []
                ready.extend(self._open.items())
                self._open = {}
                self.pending = 0
                if not self._pack:
                    await self._sock.send_each(
                        [m if peer is None else [peer, *m] for peer, ms in ready for m in ms]
                    )
                    continue
                for peer, messages in ready:
                    parts = messages[0] if len(messages) == 1 else [pack_batch(messages)]
                    await self._sock.send(parts if peer is None else [peer, *parts])
        finally:
            self._flushing = False
