"""Tenant administration under the admin key: ``/v1/admin/tenants`` and ``/v1/admin/keys``.

The gateway checks that the caller's key is the admin key; the bridge only forwards it.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from vajra.client import IssuedKey
from vajra.http._context import QUERY_TIMEOUT_S, ApiKey, Ctx
from vajra.http._responses import error_docs, json_response
from vajra.http.schemas.admin import Done, IssuedKeyBody, KeyRevoke, TenantCreate
from vajra.http.schemas.errors import ErrorBody

router = APIRouter(tags=["admin"])


def _issued(issued: IssuedKey) -> Response:
    body = {"tenant_id": issued.tenant_id, "name": issued.name, "api_key": issued.api_key}
    return json_response(body, 201)


@router.post(
    "/v1/admin/tenants",
    status_code=201,
    summary="Create a tenant; answers its first API key (shown once)",
    response_model=IssuedKeyBody,
    responses=error_docs(ErrorBody, 400, 401, 503, 504),
)
async def create_tenant(body: TenantCreate, ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        issued = await ctx.pool.client(key).create_tenant(body.name, timeout_s=QUERY_TIMEOUT_S)
    return _issued(issued)


@router.post(
    "/v1/admin/tenants/{tenant}/keys",
    status_code=201,
    summary="Issue another API key for a tenant (name or id)",
    response_model=IssuedKeyBody,
    responses=error_docs(ErrorBody, 400, 401, 404, 503, 504),
)
async def create_key(tenant: str, ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        issued = await ctx.pool.client(key).create_api_key(tenant, timeout_s=QUERY_TIMEOUT_S)
    return _issued(issued)


@router.post(
    "/v1/admin/keys/revoke",
    summary="Revoke an API key: refused from its next request on",
    response_model=Done,
    responses=error_docs(ErrorBody, 400, 401, 404, 503, 504),
)
async def revoke_key(body: KeyRevoke, ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        await ctx.pool.client(key).revoke_api_key(body.api_key, timeout_s=QUERY_TIMEOUT_S)
    return json_response({"ok": True})


@router.delete(
    "/v1/admin/tenants/{tenant}",
    summary="Delete a tenant (name or id) and all its keys",
    response_model=Done,
    responses=error_docs(ErrorBody, 400, 401, 404, 503, 504),
)
async def delete_tenant(tenant: str, ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        await ctx.pool.client(key).delete_tenant(tenant, timeout_s=QUERY_TIMEOUT_S)
    return json_response({"ok": True})
