"""The paper's usage route: ``GET /v1/usage/{tenant_id}/metrics``, totals and their cost."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from vajra.http._context import QUERY_TIMEOUT_S, ApiKey, Ctx
from vajra.http._responses import error_docs, json_response
from vajra.http.schemas.errors import ErrorBody
from vajra.http.schemas.usage import UsageMetrics
from vajra.policies.billing import inference_cost_usd

router = APIRouter(tags=["paper"])


@router.get(
    "/v1/usage/{tenant_id}/metrics",
    summary="The caller's own usage totals and cost (another tenant's id: 404)",
    response_model=UsageMetrics,
    responses=error_docs(ErrorBody, 400, 401, 404, 503, 504),
)
async def usage(tenant_id: str, ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        u = await ctx.pool.client(key).usage(tenant_id, timeout_s=QUERY_TIMEOUT_S)
    prices = ctx.cfg.policies
    cost = inference_cost_usd(
        u.gpu_ms,
        gpu_price_per_hour=prices.gpu_price_per_hour,
        tenancy_factor=prices.tenancy_factor,
    )
    return json_response(
        {
            "tenant_id": u.tenant_id,
            "name": u.name,
            "requests": u.requests,
            "gpu_ms": u.gpu_ms,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "cost_usd": cost,
        }
    )
