"""The one wire codec: a header frame and a msgpack body frame per message.

Header: msgpack array ``[version, kind, message_id, reply_to, trace_id]``.
Bulk: a kind that declares ``BULK_FRAMES = n`` (adapter uploads) is followed by exactly ``n``
raw byte frames, never inside msgpack; :func:`decode` returns them on ``Envelope.bulk``.
Body: msgpack map of the message struct's fields, decoded and type-checked in one pass by
msgspec (one typed decoder per kind).

:func:`decode` validates at the edge: a frame that is not msgpack, an unknown kind, a wrong
version, a missing or mistyped field all raise :class:`DecodeError` (a
:class:`vajra.errors.ProtocolError`) that names the problem, and never anything else, so an
actor can answer with a typed error and keep serving.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec

from vajra.bus.messages import ALL_MESSAGES, PROTOCOL_VERSION, Message
from vajra.errors import ErrorCode, ProtocolError

M = TypeVar("M", bound=Message)

#: Largest body frame accepted by :func:`decode` unless the caller says otherwise.
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: Largest total of a message's bulk frames accepted by :func:`decode` unless told otherwise.
DEFAULT_MAX_BULK_BYTES = 1 << 28


class DecodeError(ProtocolError):
    """A frame that could not be decoded; carries whatever ids could be recovered."""

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode = ErrorCode.MALFORMED_FRAME,
        field: str | None = None,
        message_id: str = "",
        request_id: str = "",
    ) -> None:
        super().__init__(message, field=field, code=code)
        self.message_id = message_id
        self.request_id = request_id


class Envelope(msgspec.Struct, frozen=True):
    """A decoded message with its header."""

    message: Message
    message_id: str
    reply_to: str | None = None
    trace_id: str | None = None
    bulk: tuple[bytes, ...] = ()  # the raw frames after the body (``message.BULK_FRAMES``)


#: The field a validation error is at: the last name of its path (``$.sampling.top_k`` and
#: ``$.sampling.stop[0]`` name ``top_k`` and ``stop``, as the request's own checks would).
_FIELD_AT = re.compile(r"at `\$(?:\.[A-Za-z_][A-Za-z0-9_]*|\[[^\]]*\])*\.([A-Za-z_][A-Za-z0-9_]*)")
_FIELD_MISSING = re.compile(r"missing required field `([A-Za-z_][A-Za-z0-9_]*)`")

#: One typed decoder per message kind: msgspec validates every field's type while decoding.
_DECODERS: dict[str, msgspec.msgpack.Decoder[Any]] = {
    cls.KIND: msgspec.msgpack.Decoder(cls) for cls in ALL_MESSAGES
}
#: What msgspec raises for bytes that are not msgpack (invalid UTF-8 raises UnicodeDecodeError).
_NOT_MSGPACK = (msgspec.DecodeError, ValueError, RecursionError)
_BULK_FRAMES: dict[str, int] = {cls.KIND: cls.BULK_FRAMES for cls in ALL_MESSAGES}
_encoder = msgspec.msgpack.Encoder()
_encode = _encoder.encode


def encode(
    message: Message,
    *,
    message_id: str = "",
    reply_to: str | None = None,
    trace_id: str | None = None,
    bulk: Sequence[bytes] = (),
) -> list[bytes]:
    """Encode ``message`` as ``[header, body, *bulk]`` frames.

    ``bulk`` must hold exactly ``message.BULK_FRAMES`` frames (ValueError otherwise).
    """
    if len(bulk) != message.BULK_FRAMES:
        raise ValueError(
            f"{message.KIND!r} takes {message.BULK_FRAMES} bulk frames, got {len(bulk)}"
        )
    header = (PROTOCOL_VERSION, message.KIND, message_id, reply_to, trace_id)
    return [_encode(header), _encode(message), *bulk]


def topic(kind: str) -> bytes:
    """The first bytes of the header of every message of ``kind`` (see :func:`encode`): the
    prefix a SUB socket subscribes with to receive that kind alone."""
    # The header is a 5-element msgpack array: 0x95, the protocol version, the kind, ...
    return b"\x95" + _encode(PROTOCOL_VERSION) + _encode(kind)


def _field_of(error: msgspec.ValidationError) -> str | None:
    text = str(error)
    m = _FIELD_AT.search(text) or _FIELD_MISSING.search(text)
    return m.group(1) if m else None


def _request_id_of(body_frame: bytes) -> str:
    """Best effort: the request id of a body that failed validation, to address the error."""
    try:
        body = msgspec.msgpack.decode(body_frame)
    except _NOT_MSGPACK:
        return ""
    rid = body.get("request_id") if isinstance(body, dict) else None
    return rid if isinstance(rid, str) else ""


def _header(header_frame: bytes) -> tuple[str, str, str | None, str | None]:
    """Check a header frame; returns ``(kind, message_id, reply_to, trace_id)``."""
    if len(header_frame) > 4096:
        raise DecodeError("header frame is larger than 4096 bytes")
    try:
        header = msgspec.msgpack.decode(header_frame)
    except _NOT_MSGPACK:
        raise DecodeError("header frame is not valid msgpack") from None
    if not isinstance(header, list) or len(header) != 5:
        raise DecodeError("header must be [version, kind, message_id, reply_to, trace_id]")
    version, kind, message_id, reply_to, trace_id = header
    if not isinstance(message_id, str):
        raise DecodeError("header message_id must be a string", field="message_id")
    if not (reply_to is None or isinstance(reply_to, str)) or not (
        trace_id is None or isinstance(trace_id, str)
    ):
        raise DecodeError("header reply_to and trace_id must be strings or nil")
    if version != PROTOCOL_VERSION:
        raise DecodeError(
            f"unsupported protocol version {version!r}; this server speaks {PROTOCOL_VERSION}",
            code=ErrorCode.UNSUPPORTED_VERSION,
            field="version",
            message_id=message_id,
        )
    if not isinstance(kind, str) or kind not in _DECODERS:
        raise DecodeError(
            f"unknown message kind {kind!r}",
            code=ErrorCode.UNKNOWN_KIND,
            field="kind",
            message_id=message_id,
        )
    return kind, message_id, reply_to, trace_id


def _body(
    header: tuple[str, str, str | None, str | None],
    body_frame: bytes,
    bulk: tuple[bytes, ...],
    max_body_bytes: int,
    max_bulk_bytes: int,
) -> Envelope:
    """Decode a body (and check its bulk frames) for a header :func:`_header` accepted."""
    kind, message_id, reply_to, trace_id = header
    if len(body_frame) > max_body_bytes:
        raise DecodeError(
            f"body of {len(body_frame)} bytes exceeds the limit of {max_body_bytes}",
            code=ErrorCode.PAYLOAD_TOO_LARGE,
            message_id=message_id,
        )
    try:
        message = _DECODERS[kind].decode(body_frame)
    except msgspec.ValidationError as exc:
        raise DecodeError(
            f"{kind}: {exc}",
            field=_field_of(exc),
            message_id=message_id,
            request_id=_request_id_of(body_frame),
        ) from None
    except _NOT_MSGPACK:
        raise DecodeError(
            f"{kind}: body frame is not valid msgpack", message_id=message_id
        ) from None
    # Unknown extra fields are ignored: a newer sender may add fields we do not know yet.
    if not bulk:
        return Envelope(message, message_id, reply_to, trace_id)
    total = sum(len(f) for f in bulk)
    if total > max_bulk_bytes:
        rid = getattr(message, "request_id", "")
        raise DecodeError(
            f"{kind}: {total} bytes of attached data exceed the limit of {max_bulk_bytes}",
            code=ErrorCode.PAYLOAD_TOO_LARGE,
            message_id=message_id,
            request_id=rid if isinstance(rid, str) else "",
        )
    return Envelope(message, message_id, reply_to, trace_id, bulk)


def decode(
    frames: Sequence[bytes],
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_bulk_bytes: int = DEFAULT_MAX_BULK_BYTES,
) -> Envelope:
    """Decode ``[header, body, *bulk]`` frames into an :class:`Envelope`; raises :class:`DecodeError`.

    The number of bulk frames must be what the kind declares; their total size at most
    ``max_bulk_bytes`` (checked after the body, so the error can name the request).
    """
    if len(frames) < 2:
        raise DecodeError(f"expected 2 frames (header, body), got {len(frames)}")
    header = _header(frames[0])
    kind, message_id = header[0], header[1]
    n_bulk = _BULK_FRAMES[kind]
    if len(frames) != 2 + n_bulk:
        if n_bulk == 0:
            raise DecodeError(f"expected 2 frames (header, body), got {len(frames)}")
        raise DecodeError(
            f"{kind}: expected {2 + n_bulk} frames (header, body, {n_bulk} bulk), "
            f"got {len(frames)}",
            message_id=message_id,
        )
    return _body(header, frames[1], tuple(frames[2:]), max_body_bytes, max_bulk_bytes)


#: One message of a batch: what it decoded to (or why not), and its own frames.
Decoded = tuple[Envelope | DecodeError, Sequence[bytes]]

_batch_decoder = msgspec.msgpack.Decoder(list[list[bytes]])


def pack_batch(messages: Sequence[Sequence[bytes]]) -> bytes:
    """One frame carrying several messages: a msgpack array of each message's frames."""
    return _encode(messages)


def decode_many(
    frames: Sequence[bytes],
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_bulk_bytes: int = DEFAULT_MAX_BULK_BYTES,
) -> list[Decoded]:
    """Decode a ZeroMQ message from an internal hop: one message, or a batch of them.

    Internal hops gather the messages for one peer into one ZeroMQ message (see
    :class:`vajra.bus.outbox.Outbox`): a single frame made by :func:`pack_batch`. A message
    alone travels as its own frames (``[header, body, *bulk]``, never one frame). Each
    message is decoded on its own, so a bad one costs only itself.
    """
    if len(frames) != 1:
        messages: Sequence[Sequence[bytes]] = (frames,)
    else:
        try:
            messages = _batch_decoder.decode(frames[0])
        except (msgspec.ValidationError, *_NOT_MSGPACK):
            return [(DecodeError("a one-frame message must be a batch of messages"), frames)]
    out: list[Decoded] = []
    for own in messages:
        try:
            env: Envelope | DecodeError = decode(
                own, max_body_bytes=max_body_bytes, max_bulk_bytes=max_bulk_bytes
            )
        except DecodeError as exc:
            env = exc
        out.append((env, own))
    return out


def decode_as(frames: Sequence[bytes], cls: type[M], **kw: Any) -> tuple[M, Envelope]:
    """Decode and require a particular message type."""
    env = decode(frames, **kw)
    if not isinstance(env.message, cls):
        raise DecodeError(
            f"expected a {cls.KIND!r} message here, got {env.message.KIND!r}",
            code=ErrorCode.UNKNOWN_KIND,
            field="kind",
            message_id=env.message_id,
        )
    return env.message, env
