"""Vajra's client SDK: a Trio client, a blocking client, and the values and errors they share.

::

    from vajra.client import AsyncClient, Client

    with Client("tcp://127.0.0.1:5555", api_key="...") as client:
        print(client.infer("Hello", max_tokens=16).text)

    async with AsyncClient("tcp://127.0.0.1:5555", api_key="...") as client:
        async with client.stream("Hello") as chunks:
            async for chunk in chunks:
                print(chunk.text, end="")

Every failure is raised as a :class:`VajraError` subclass; :class:`TimeoutError` is also the
builtin ``TimeoutError``; ``error.retriable`` says whether sending again may succeed.
"""

from vajra.client._async import AsyncClient
from vajra.client._stream import Stream
from vajra.client._sync import Client
from vajra.client._types import (
    AdapterInfo,
    ExecutorStatus,
    InferenceResult,
    IssuedKey,
    StreamChunk,
    Tenant,
    TenantUsage,
    Usage,
)
from vajra.errors import (
    AuthError,
    Cancelled,
    InternalError,
    InvalidRequest,
    NotFoundError,
    OverloadedError,
    PayloadTooLarge,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    TimeoutError,
    UnavailableError,
    VajraError,
)

__all__ = [
    "AdapterInfo",
    "AsyncClient",
    "AuthError",
    "Cancelled",
    "Client",
    "ExecutorStatus",
    "InferenceResult",
    "InternalError",
    "InvalidRequest",
    "IssuedKey",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLarge",
    "ProtocolError",
    "QuotaExceeded",
    "RateLimited",
    "Stream",
    "StreamChunk",
    "Tenant",
    "TenantUsage",
    "TimeoutError",
    "UnavailableError",
    "Usage",
    "VajraError",
]
