"""A test's end of an internal socket: messages one at a time, however they were batched."""

from __future__ import annotations

from collections import deque

from vajra.bus.codec import DecodeError, decode_many
from vajra.bus.messages import GatewayHello, Message
from vajra.bus.zsocket import ZSocket


class Inbox:
    """Takes apart what an actor sends on an internal hop (one or more messages per frame set).

    ``routed``: the socket is a ROUTER, so each ZeroMQ message starts with the peer's identity.
    ``skip``: message kinds to drop (a gateway's periodic ``GatewayHello``, by default).
    """

    def __init__(
        self,
        sock: ZSocket,
        *,
        routed: bool,
        skip: tuple[type[Message], ...] = (GatewayHello,),
    ) -> None:
        self.sock = sock
        self.routed = routed
        self.skip = skip
        self._ready: deque[Message] = deque()

    async def next(self) -> Message:
        while not self._ready:
            frames = await self.sock.recv()
            for env, _ in decode_many(frames[1:] if self.routed else frames):
                assert not isinstance(env, DecodeError), env
                if not isinstance(env.message, self.skip):
                    self._ready.append(env.message)
        return self._ready.popleft()
