"""The message bus: typed messages, the msgpack codec and the Trio adapter over ZeroMQ."""

from vajra.bus.codec import DecodeError, Envelope, decode, decode_as, encode
from vajra.bus.zsocket import DEALER, PUB, ROUTER, SUB, ZSocket, new_context, open_socket

__all__ = [
    "DEALER",
    "PUB",
    "ROUTER",
    "SUB",
    "DecodeError",
    "Envelope",
    "ZSocket",
    "decode",
    "decode_as",
    "encode",
    "new_context",
    "open_socket",
]
