"""Errors as the bridge answers them: one status per Vajra error code, two JSON shapes.

Native routes answer ``{"error": {"code", "message", "field"}}``; the OpenAI-compatible routes
answer OpenAI's ``{"error": {"message", "type", "param", "code"}}``. ``code`` is stable (a
:class:`vajra.errors.ErrorCode` value or one of the bridge's own: ``model_not_found``,
``method_not_allowed``, ``http_error``);
``field``/``param`` names the input to blame where there is one.

Per-tenant limits are the gateway's: its ``rate_limited`` / ``concurrency_limited`` errors
become 429 with ``Retry-After`` (whole seconds, at least 1) from the gateway's
``retry_after_ms``.

:func:`install_handlers` makes every failure of a route one of these answers: a Vajra error by
its code, a body that fails validation as 400 naming the field (never FastAPI's 422), a body
that is not JSON as 400 saying how to send it, anything unexpected as a logged 500.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from vajra.errors import ErrorCode, RateLimited, VajraError

log = logging.getLogger("vajra.http")

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
    ErrorCode.NO_CAPACITY: 503,
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


_OPENAI_EXACT = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})


def is_openai_path(path: str) -> bool:
    """OpenAI's routes answer errors in OpenAI's shape; ``/v1/models/{id}`` is one of them."""
    return path in _OPENAI_EXACT or (path.startswith("/v1/models/") and path.count("/") == 3)


def render_error(err: ApiError, path: str) -> Response:
    """``err`` in the shape of the route at ``path``."""
    return error_response(err, openai=is_openai_path(path))


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def validation_error(exc: RequestValidationError, content_type: str | None) -> ApiError:
    """The 400 for a request that failed validation: the first error, naming its field."""
    first: Mapping[str, Any] = exc.errors()[0] if exc.errors() else {}
    raw_loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        # FastAPI's location is ("body", character offset); report it in the message as a
        # byte offset (JSON bodies are UTF-8), not as a field.
        pos = raw_loc[-1] if raw_loc else None
        if isinstance(exc.body, str) and isinstance(pos, int):
            pos = len(exc.body[:pos].encode("utf-8", "surrogatepass"))
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        return ApiError(
            400, "invalid_request", f"the request body is not valid JSON: {reason} at byte {pos}"
        )
    loc = [str(x) for x in raw_loc]
    if loc == ["body"] and not _is_json(content_type):
        sent = f"it was sent as {content_type}" if content_type else "it had no Content-Type"
        return ApiError(
            400,
            "invalid_request",
            f"the request body must be JSON sent with `Content-Type: application/json`; {sent}",
        )
    if loc and loc[0] in ("body", "path", "query", "header"):
        loc = loc[1:]
    field = ".".join(loc) or None
    message = f"{field}: {first.get('msg', 'invalid')}" if field else "invalid request body"
    return ApiError(400, "invalid_request", message, field=field)


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return render_error(exc, request.url.path)


async def _on_vajra_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, VajraError)
    err = ApiError.from_vajra(exc)
    if is_openai_path(request.url.path) and err.field == "adapter":
        err.field = "model"
    return render_error(err, request.url.path)


async def _on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    err = validation_error(exc, request.headers.get("content-type"))
    return render_error(err, request.url.path)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        exc.status_code, "invalid_request" if exc.status_code == 400 else "http_error"
    )
    err = ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers)
    return render_error(err, request.url.path)


async def _on_unicode(request: Request, exc: Exception) -> Response:
    return render_error(
        ApiError(400, "invalid_request", "text must be valid UTF-8"), request.url.path
    )


async def _on_crash(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return render_error(
        ApiError(500, "internal", "internal error in the HTTP bridge"), request.url.path
    )


def install_handlers(app: FastAPI) -> None:
    """Answer every failure of ``app``'s routes in one of the two shapes."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(VajraError, _on_vajra_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(UnicodeEncodeError, _on_unicode)
    app.add_exception_handler(Exception, _on_crash)
