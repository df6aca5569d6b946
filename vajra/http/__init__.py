"""The HTTP bridge: the paper's API and an OpenAI-compatible API over the gateway.

::

    vajra actor http --config FILE        # alone, in front of cluster.gateway_address
    vajra up --http-port 8080             # as one more supervised actor

An ASGI application (FastAPI) served by Hypercorn's Trio worker. It holds no state of its
own: every call goes through :class:`vajra.client.AsyncClient` (a few shared connections,
each request carrying its caller's API key) to the gateway, which authenticates it.
"""

from vajra.http._app import create_app
from vajra.http._bridge import HttpBridge, base_model_name
from vajra.http._chat import ChatTemplate
from vajra.http._context import BridgeContext
from vajra.http._gateway import GatewayPool
from vajra.http._metrics import BridgeMetrics

__all__ = [
    "BridgeContext",
    "BridgeMetrics",
    "ChatTemplate",
    "GatewayPool",
    "HttpBridge",
    "base_model_name",
    "create_app",
]
