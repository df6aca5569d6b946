"""What every route shares: the bridge's context and the caller's API key, as dependencies.

:func:`~vajra.http.create_app` stores the :class:`BridgeContext` on the application; a route
takes it as a ``ctx: Ctx`` parameter and the caller's key as ``key: ApiKey``. A request
without a key is answered 401 before the route runs; the key itself is checked by the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from vajra.config import VajraConfig
from vajra.http._chat import ChatTemplate
from vajra.http._errors import ApiError
from vajra.http._gateway import GatewayPool
from vajra.http._metrics import BridgeMetrics

#: How long a query, admin or adapter-listing call through the gateway may take.
QUERY_TIMEOUT_S = 10.0


@dataclass
class BridgeContext:
    """Everything the routes share; built by :class:`~vajra.http.HttpBridge` (or a test)."""

    cfg: VajraConfig
    pool: GatewayPool
    metrics: BridgeMetrics
    chat: ChatTemplate
    base_model: str


def bridge_context(request: Request) -> BridgeContext:
    ctx = request.app.state.ctx
    assert isinstance(ctx, BridgeContext), "create_app stores the context"
    return ctx


_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY`")


async def api_key(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if creds is None or not creds.credentials:
        raise ApiError(401, "auth_failed", "missing API key: send `Authorization: Bearer KEY`")
    return creds.credentials


Ctx = Annotated[BridgeContext, Depends(bridge_context)]
ApiKey = Annotated[str, Depends(api_key)]
