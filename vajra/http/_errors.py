"""Errors as the bridge answers them: one status per Vajra error code, two JSON shapes.

Native routes answer ``{"error": {"code", "message", "field"}}``; the OpenAI-compatible routes
answer OpenAI's ``{"error": {"message", "type", "param", "code"}}``. ``code`` is stable (a
:class:`vajra.errors.ErrorCode` value or one of the bridge's own: ``model_not_found``,
``method_not_allowed``, ``http_error``);
``field``/``param`` names the input to blame where there is one.

Per-tenant limits are the gateway's: its ``rate_limited`` / ``concurrency_limited`` errors
become 429 with ``Retry-After`` (whole seconds, at least 1) from the gateway's
``retry_after_ms``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from starlette.responses import Response

from vajra.errors import ErrorCode, RateLimited, VajraError

#: HTTP status for each Vajra error code.
STATUS_BY_CODE: dict[str, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.AUTH_FAILED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.QUOTA_EXCEEDED: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.CONCURRENCY_LIMITED: 429,
    ErrorCode.CANCELLED: 499,  # the client went away (nginx's "client closed request")
    ErrorCode.OVERLOADED: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.MALFORMED_FRAME: 502,
    ErrorCode.UNKNOWN_KIND: 502,
    ErrorCode.UNSUPPORTED_VERSION: 502,
    ErrorCode.INTERNAL: 500,
}

_OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """An HTTP error answer: status, stable code, message, blamed field, extra headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    @classmethod
    def from_vajra(cls, exc: VajraError) -> ApiError:
        if isinstance(exc, RateLimited):
            return rate_limited(exc.code.value, exc.message, exc.retry_after_s)
        status = STATUS_BY_CODE.get(exc.code.value, 500)
        headers = {"Retry-After": "1"} if exc.retriable else None
        return cls(status, exc.code.value, exc.message, field=exc.field, headers=headers)


def rate_limited(code: str, message: str, retry_after_s: float) -> ApiError:
    """A 429 whose ``Retry-After`` is whole seconds, at least 1."""
    seconds = max(1, math.ceil(retry_after_s))
    return ApiError(429, code, message, headers={"Retry-After": str(seconds)})


def error_body(err: ApiError, *, openai: bool) -> dict[str, object]:
    if openai:
        kind = _OPENAI_TYPE.get(err.status, "server_error" if err.status >= 500 else "api_error")
        return {
            "error": {"message": err.message, "type": kind, "param": err.field, "code": err.code}
        }
    return {"error": {"code": err.code, "message": err.message, "field": err.field}}


def error_response(err: ApiError, *, openai: bool) -> Response:
    return Response(
        json.dumps(error_body(err, openai=openai)),
        status_code=err.status,
        headers=err.headers,
        media_type="application/json",
    )


def sse_error(err: ApiError, *, openai: bool) -> bytes:
    """The error event sent when a stream fails after it started (status 200 already sent)."""
    return b"data: " + json.dumps(error_body(err, openai=openai)).encode() + b"\n\n"
