"""Typed errors shared by every actor, the wire format and the client SDK.

An error travels between processes as an ``ErrorReply`` carrying an :class:`ErrorCode`,
a human message and, where one input is to blame, the name of the offending field.
:func:`error_from_code` turns that back into the matching exception class, so the SDK
raises the same type that the actor meant.
"""

from __future__ import annotations

import builtins
from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request"
    AUTH_FAILED = "auth_failed"
    NOT_FOUND = "not_found"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    MALFORMED_FRAME = "malformed_frame"
    UNKNOWN_KIND = "unknown_kind"
    UNSUPPORTED_VERSION = "unsupported_version"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    QUOTA_EXCEEDED = "quota_exceeded"
    RATE_LIMITED = "rate_limited"
    CONCURRENCY_LIMITED = "concurrency_limited"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    NO_CAPACITY = "no_capacity"


RETRIABLE_CODES = frozenset(
    {
        ErrorCode.OVERLOADED,
        ErrorCode.TIMEOUT,
        ErrorCode.UNAVAILABLE,
        ErrorCode.RATE_LIMITED,
        ErrorCode.CONCURRENCY_LIMITED,
        ErrorCode.NO_CAPACITY,
    }
)


class VajraError(Exception):
    """Base of every error Vajra raises on purpose.

    ``retriable`` says whether sending the same request again may succeed.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    @property
    def retriable(self) -> bool:
        return self.code in RETRIABLE_CODES

    def __str__(self) -> str:
        if self.field:
            return f"{self.code.value}: {self.message} (field: {self.field})"
        return f"{self.code.value}: {self.message}"


class InvalidRequest(VajraError):
    code = ErrorCode.INVALID_REQUEST


class AuthError(VajraError):
    code = ErrorCode.AUTH_FAILED


class NotFoundError(VajraError):
    code = ErrorCode.NOT_FOUND


class OverloadedError(VajraError):
    code = ErrorCode.OVERLOADED


class TimeoutError(VajraError, builtins.TimeoutError):
    """The request's deadline passed before an answer came; retriable."""

    code = ErrorCode.TIMEOUT


class UnavailableError(VajraError):
    """No executor could serve the request (none registered, or it died mid-request); retriable."""

    code = ErrorCode.UNAVAILABLE


#: The ``field`` of the UnavailableError that answers a request whose executor was lost (the
#: scheduler sends it); a gateway places a stream that has sent no token yet once more.
EXECUTOR_LOST_FIELD = "executor"


class ProtocolError(VajraError):
    """A frame that could not be decoded: not msgpack, unknown kind, wrong version, bad fields."""

    code = ErrorCode.MALFORMED_FRAME

    def __init__(
        self, message: str, *, field: str | None = None, code: ErrorCode | None = None
    ) -> None:
        super().__init__(message, field=field)
        if code is not None:
            self.code = code


class PayloadTooLarge(VajraError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class QuotaExceeded(VajraError):
    """A tenant's limit (adapters, versions of one adapter) would be passed; not retriable
    until something is deleted."""

    code = ErrorCode.QUOTA_EXCEEDED


class RateLimited(VajraError):
    """The tenant is over its request rate (``rate_limited``) or has too many requests in
    flight (``concurrency_limited``); retriable after ``retry_after_s``."""

    code = ErrorCode.RATE_LIMITED

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: float = 1.0,
        code: ErrorCode | None = None,
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code


class Cancelled(VajraError):
    """The request was cancelled by its caller (a cancel message, a client that went away)."""

    code = ErrorCode.CANCELLED


class InternalError(VajraError):
    code = ErrorCode.INTERNAL


class NoCapacityError(VajraError):
    """No executor of the request's base model had room for it within the provisioning wait
    (``scheduler.no_capacity_wait_ms``); retriable."""

    code = ErrorCode.NO_CAPACITY


_BY_CODE: dict[ErrorCode, type[VajraError]] = {
    ErrorCode.INVALID_REQUEST: InvalidRequest,
    ErrorCode.AUTH_FAILED: AuthError,
    ErrorCode.NOT_FOUND: NotFoundError,
    ErrorCode.OVERLOADED: OverloadedError,
    ErrorCode.TIMEOUT: TimeoutError,
    ErrorCode.UNAVAILABLE: UnavailableError,
    ErrorCode.PAYLOAD_TOO_LARGE: PayloadTooLarge,
    ErrorCode.QUOTA_EXCEEDED: QuotaExceeded,
    ErrorCode.CANCELLED: Cancelled,
    ErrorCode.INTERNAL: InternalError,
    ErrorCode.NO_CAPACITY: NoCapacityError,
}


def error_from_code(
    code: str, message: str, field: str | None = None, *, retry_after_ms: int = 0
) -> VajraError:
    """Rebuild the exception an ``ErrorReply`` stands for; unknown codes become InternalError."""
    try:
        parsed = ErrorCode(code)
    except ValueError:
        return InternalError(f"{code}: {message}", field=field)
    if parsed in (ErrorCode.RATE_LIMITED, ErrorCode.CONCURRENCY_LIMITED):
        return RateLimited(
            message, field=field, retry_after_s=max(0, retry_after_ms) / 1000.0, code=parsed
        )
    if parsed in (
        ErrorCode.MALFORMED_FRAME,
        ErrorCode.UNKNOWN_KIND,
        ErrorCode.UNSUPPORTED_VERSION,
    ):
        return ProtocolError(message, field=field, code=parsed)
    return _BY_CODE.get(parsed, InternalError)(message, field=field)
