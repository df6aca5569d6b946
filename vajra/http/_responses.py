"""JSON answers, and how the routes document their error answers and streams in OpenAPI."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response


def json_response(obj: object, status: int = 200) -> Response:
    """``obj`` as compact JSON (routes build plain dicts; FastAPI's encoder is not needed)."""
    return Response(
        json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json"
    )


_ERROR_TEXT = {
    400: "Invalid request; `field`/`param` names the input to blame",
    401: "Missing, unknown or revoked API key (or admin key)",
    403: "A tenant quota would be passed (`quota_exceeded`); delete something first",
    404: "No such model, adapter or tenant, or one that belongs to another tenant",
    413: "Request body too large",
    429: "Per-tenant rate or concurrency limit; see Retry-After",
    503: "The gateway is down, shutting down or overloaded; see Retry-After",
    504: "The request's deadline passed",
}


def error_docs(model: type, *codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` entries documenting ``codes``, each answered with body ``model``."""
    return {c: {"model": model, "description": _ERROR_TEXT[c]} for c in codes}


#: How a ``"stream": true`` answer is documented (server-sent events).
SSE_DOC = {
    "text/event-stream": {
        "schema": {"type": "string"},
        "example": 'data: {"choices":[{"text":" the","index":0}]}\n\ndata: [DONE]\n\n',
    }
}
