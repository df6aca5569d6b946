"""Operations: Prometheus metrics (``GET /metrics``) and liveness (``/healthz``, ``/health``).

``/health`` is the path vLLM serves and benchmark tools (guidellm) probe; it answers exactly
as ``/healthz`` does: 200, with ``gateway`` saying whether the gateway answers.
"""

from __future__ import annotations

import logging

import trio
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from vajra.client import VajraError
from vajra.http._context import Ctx
from vajra.http._responses import json_response
from vajra.http.schemas.operations import Health

log = logging.getLogger("vajra.http")

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(ctx: Ctx) -> Response:
    if ctx.pool.up and ctx.pool.admin_key:  # gateway-wide views need the admin key
        try:
            with trio.move_on_after(1.0):
                executors = await ctx.pool.operator_client.cluster_status(timeout_s=1.0)
                ctx.metrics.set_executors(executors)
        except VajraError as exc:
            log.debug("no executor status for /metrics: %s", exc)
    ctx.metrics.gateway_up.set(1 if ctx.pool.up else 0)
    ctx.metrics.gateway_inflight.set(ctx.pool.gateway_counters.get("inflight", 0))
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


_HEALTH_SUMMARY = "Liveness; `gateway` says whether the gateway answers"


@router.get("/health", summary=f"{_HEALTH_SUMMARY} (the same as /healthz)", response_model=Health)
@router.get("/healthz", summary=_HEALTH_SUMMARY, response_model=Health)
async def healthz(ctx: Ctx) -> Response:
    return json_response({"status": "ok", "gateway": "up" if ctx.pool.up else "down"})
