"""The one wire codec: a header frame and a msgpack body frame per message.

Header: msgpack array ``[version, kind, message_id, reply_to, trace_id]``.
Body: msgpack map of the message's dataclass fields.

:func:`decode` validates at the edge: a frame that is not msgpack, an unknown kind, a wrong
version, a missing or mistyped field all raise :class:`DecodeError` (a
:class:`vajra.errors.ProtocolError`) that names the problem, and never anything else, so an
actor can answer with a typed error and keep serving.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

import msgpack

from vajra.bus.messages import ALL_MESSAGES, PROTOCOL_VERSION, Message
from vajra.errors import ErrorCode, ProtocolError

M = TypeVar("M", bound=Message)

#: Largest body frame accepted by :func:`decode` unless the caller says otherwise.
DEFAULT_MAX_BODY_BYTES = 1 << 20


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


@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded message with its header."""

    message: Message
    message_id: str
    reply_to: str | None = None
    trace_id: str | None = None


Checker = Callable[[Any], tuple[bool, Any]]


def _checker_for(tp: Any) -> Checker:
    """Build a fast validator for one annotated field type; returns (ok, normalised value)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        inner = [_checker_for(a) for a in args if a is not type(None)]
        allows_none = type(None) in args

        def check_union(v: Any) -> tuple[bool, Any]:
            if v is None:
                return allows_none, None
            for c in inner:
                ok, out = c(v)
                if ok:
                    return True, out
            return False, v

        return check_union
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        item = _checker_for(item_tp)

        def check_list(v: Any) -> tuple[bool, Any]:
            if not isinstance(v, list):
                return False, v
            out = []
            for x in v:
                ok, y = item(x)
                if not ok:
                    return False, v
                out.append(y)
            return True, out

        return check_list
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        key_c, val_c = _checker_for(key_tp), _checker_for(val_tp)

        def check_dict(v: Any) -> tuple[bool, Any]:
            if not isinstance(v, dict):
                return False, v
            out = {}
            for k, x in v.items():
                ok_k, k2 = key_c(k)
                ok_v, x2 = val_c(x)
                if not (ok_k and ok_v):
                    return False, v
                out[k2] = x2
            return True, out

        return check_dict
    if tp is bool:
        return lambda v: (isinstance(v, bool), v)
    if tp is int:
        return lambda v: (isinstance(v, int) and not isinstance(v, bool), v)
    if tp is float:
        return lambda v: (
            (isinstance(v, (int, float)) and not isinstance(v, bool)),
            float(v) if isinstance(v, int | float) else v,
        )
    if tp is str:
        return lambda v: (isinstance(v, str), v)
    if tp is bytes:
        return lambda v: (isinstance(v, bytes), v)
    raise TypeError(f"codec cannot validate field type {tp!r}")


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    name: str
    check: Checker
    required: bool
    type_name: str


@dataclass(frozen=True, slots=True)
class _Schema:
    cls: type[Message]
    fields: tuple[_FieldSpec, ...]
    names: frozenset[str]


def _schema(cls: type[Message]) -> _Schema:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in fields(cls):
        required = f.default is MISSING and f.default_factory is MISSING
        specs.append(_FieldSpec(f.name, _checker_for(hints[f.name]), required, str(hints[f.name])))
    return _Schema(cls, tuple(specs), frozenset(s.name for s in specs))


_SCHEMAS: dict[str, _Schema] = {cls.KIND: _schema(cls) for cls in ALL_MESSAGES}
_FIELD_NAMES: dict[type[Message], tuple[str, ...]] = {
    s.cls: tuple(f.name for f in s.fields) for s in _SCHEMAS.values()
}

_packb = msgpack.Packer(use_bin_type=True).pack


def encode(
    message: Message,
    *,
    message_id: str = "",
    reply_to: str | None = None,
    trace_id: str | None = None,
) -> list[bytes]:
    """Encode ``message`` as ``[header, body]`` frames."""
    names = _FIELD_NAMES[type(message)]
    body = {n: getattr(message, n) for n in names}
    header = [PROTOCOL_VERSION, message.KIND, message_id, reply_to, trace_id]
    return [_packb(header), _packb(body)]


def _unpack(frame: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"{what} frame is not valid msgpack ({type(exc).__name__})") from None


def decode(frames: Sequence[bytes], *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Envelope:
    """Decode ``[header, body]`` frames into an :class:`Envelope`; raises :class:`DecodeError`."""
    if len(frames) != 2:
        raise DecodeError(f"expected 2 frames (header, body), got {len(frames)}")
    header_frame, body_frame = frames
    if len(header_frame) > 4096:
        raise DecodeError("header frame is larger than 4096 bytes")
    header = _unpack(header_frame, "header")
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
    schema = _SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise DecodeError(
            f"unknown message kind {kind!r}",
            code=ErrorCode.UNKNOWN_KIND,
            field="kind",
            message_id=message_id,
        )
    if len(body_frame) > max_body_bytes:
        raise DecodeError(
            f"body of {len(body_frame)} bytes exceeds the limit of {max_body_bytes}",
            code=ErrorCode.PAYLOAD_TOO_LARGE,
            message_id=message_id,
        )
    body = _unpack(body_frame, "body")
    if not isinstance(body, dict):
        raise DecodeError("body must be a map of fields", message_id=message_id)
    rid = body.get("request_id")
    request_id = rid if isinstance(rid, str) else ""
    values: dict[str, Any] = {}
    for spec in schema.fields:
        if spec.name not in body:
            if spec.required:
                raise DecodeError(
                    f"{kind}: missing required field {spec.name!r}",
                    field=spec.name,
                    message_id=message_id,
                    request_id=request_id,
                )
            continue
        ok, value = spec.check(body[spec.name])
        if not ok:
            raise DecodeError(
                f"{kind}: field {spec.name!r} must be {spec.type_name}, "
                f"got {type(body[spec.name]).__name__}",
                field=spec.name,
                message_id=message_id,
                request_id=request_id,
            )
        values[spec.name] = value
    # Unknown extra fields are ignored: a newer sender may add fields we do not know yet.
    return Envelope(schema.cls(**values), message_id, reply_to, trace_id)


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
