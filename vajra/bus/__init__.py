"""The message bus: typed messages, the msgpack codec and the Trio adapter over ZeroMQ."""

from vajra.bus.codec import DecodeError, Envelope, decode, decode_as, encode
from vajra.bus.zsocket import ZSocket, open_socket

__all__ = ["DecodeError", "Envelope", "ZSocket", "decode", "decode_as", "encode", "open_socket"]
