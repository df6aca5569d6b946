"""The ASGI application: the routers, error handlers, middleware and OpenAPI document.

Authentication and per-tenant rate and concurrency limits are the gateway's (each request
carries the caller's key; a refusal becomes 429 with ``Retry-After``); the bridge adds body
size and time limits, a deadline per request (``http.request_timeout_s``, sent to the gateway
as the request's deadline), metrics and the two error shapes (see :mod:`vajra.http._errors`).
A caller that goes away cancels its generation at the gateway (through the SDK). The routes
themselves are in :mod:`vajra.http.routes`, one router per resource.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from vajra.http._context import BridgeContext
from vajra.http._errors import install_handlers, render_error
from vajra.http._limits import BodySizeLimit
from vajra.http._metrics import RequestMetrics
from vajra.http.routes import (
    adapters,
    admin,
    chat,
    completions,
    infer,
    jobs,
    models,
    operations,
    usage,
)

_DESCRIPTION = (
    "Serverless multi-tenant LoRA serving. The paper's API (`/v1/models/{model_id}/infer`,"
    " `/v1/usage/{tenant_id}/metrics`, `/v1/models/{model_id}/train`, `/v1/jobs`), an"
    " OpenAI-compatible API (`/v1/completions`, "
    "`/v1/chat/completions`, `/v1/models`), tenant administration under the admin key, "
    "and Prometheus metrics. Authenticate with `Authorization: Bearer KEY`."
)


def create_app(ctx: BridgeContext) -> FastAPI:
    """The bridge's FastAPI application over ``ctx`` (which must be running)."""
    app = FastAPI(title="Vajra HTTP bridge", version="1.0", description=_DESCRIPTION)
    app.state.ctx = ctx
    install_handlers(app)
    for module in (infer, usage, completions, chat, models, adapters, admin, operations, jobs):
        app.include_router(module.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            # Validation errors are answered 400 (with the field), never FastAPI's 422.
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    upload_max_bytes = ctx.cfg.adapters.max_adapter_bytes + adapters.UPLOAD_OVERHEAD_BYTES
    app.add_middleware(
        BodySizeLimit,
        max_bytes=ctx.cfg.http.max_body_bytes,
        render=render_error,
        per_path={
            adapters.UPLOAD_PATH: upload_max_bytes,
            adapters.TENSORS_PATH: upload_max_bytes * 4 // 3 + adapters.UPLOAD_OVERHEAD_BYTES,
        },
        per_pattern={jobs.TRAIN_PATH_PATTERN: jobs.train_body_limit(ctx.cfg)},
        timeout_s=ctx.cfg.http.body_timeout_s,
    )
    app.add_middleware(RequestMetrics, metrics=ctx.metrics)
    return app
