"""The paper's usage route: ``GET /v1/usage/{tenant_id}/metrics``, totals, invoice and costs.

Query parameters: ``start`` / ``end`` (Unix milliseconds or ISO 8601; the UTC days that
overlap ``[start, end)``) and ``group_by`` (``adapter``, ``kind`` or ``day``). Every cost comes
from :mod:`vajra.policies.billing`; the caller's key sees only its own tenant (the admin key
may name any).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.responses import Response

from vajra.client._usage import parse_when
from vajra.http._context import QUERY_TIMEOUT_S, ApiKey, Ctx
from vajra.http._responses import error_docs, json_response
from vajra.http.schemas.errors import ErrorBody
from vajra.http.schemas.usage import UsageMetrics
from vajra.policies.billing import InvoiceLine, Prices, cost_usd

router = APIRouter(tags=["paper"])


def _line(line: InvoiceLine) -> dict[str, Any]:
    return {
        "label": line.label,
        "events": line.events,
        "gpu_ms": line.gpu_ms,
        "billed_ms": line.billed_ms,
        "prompt_tokens": line.prompt_tokens,
        "completion_tokens": line.completion_tokens,
        "gradients": line.gradients,
        "inference_cost_usd": line.inference_cost_usd,
        "training_cost_usd": line.training_cost_usd,
        "cost_usd": line.cost_usd,
    }


@router.get(
    "/v1/usage/{tenant_id}/metrics",
    summary="Usage totals, an invoice of a range of days and their cost (another tenant: 404)",
    response_model=UsageMetrics,
    responses=error_docs(ErrorBody, 400, 401, 404, 503, 504),
)
async def usage(
    tenant_id: str,
    ctx: Ctx,
    key: ApiKey,
    start: Annotated[str | None, Query(max_length=64)] = None,
    end: Annotated[str | None, Query(max_length=64)] = None,
    group_by: Annotated[str | None, Query(max_length=16)] = None,
) -> Response:
    start_ms = None if start is None else parse_when(start, "start")
    end_ms = None if end is None else parse_when(end, "end")
    with ctx.pool.guard():
        u = await ctx.pool.client(key).usage(
            tenant_id, start_ms, end_ms, group_by, timeout_s=QUERY_TIMEOUT_S
        )
    prices = Prices.of(ctx.cfg.policies)
    report = u.invoice(prices)
    return json_response(
        {
            "tenant_id": u.tenant_id,
            "name": u.name,
            "requests": u.requests,
            "gpu_ms": u.gpu_ms,
            "billed_ms": u.billed_ms,
            "gradients": u.gradients,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "cost_usd": cost_usd(u.billed_ms, u.gradients, prices),
            "group_by": group_by,
            "start_unix_ms": start_ms,
            "end_unix_ms": end_ms,
            "lines": [_line(line) for line in report.lines],
            "total": _line(report.total) if report.total is not None else None,
        }
    )
