"""What a client sends: the wire request of each call, checked before it leaves, and its frames.

Fields the gateway would refuse for any cluster are refused here first, by the same rules
(:mod:`vajra.policies.request_rules`) and with the same :class:`~vajra.errors.InvalidRequest`
field names, so a bad value fails before it is sent. Limits that depend on the cluster's
configuration (prompt length, its ``max_tokens`` limit) are left to the gateway.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

from vajra.bus.codec import encode
from vajra.bus.messages import (
    AdapterDelete,
    AdapterList,
    AdapterMerge,
    AdapterPush,
    AdapterRollback,
    AdminRequest,
    CancelRequest,
    ClusterStatusRequest,
    InferRequest,
    PingRequest,
    Sampling,
    StatsRequest,
    UsageQuery,
    WhoAmIRequest,
)
from vajra.errors import InvalidRequest, PayloadTooLarge
from vajra.policies.decoding import SamplingParams
from vajra.policies.request_rules import check_id

#: Every request a client sends; each is answered by its ``request_id``.
Request = (
    InferRequest
    | StatsRequest
    | PingRequest
    | WhoAmIRequest
    | UsageQuery
    | AdminRequest
    | ClusterStatusRequest
    | AdapterPush
    | AdapterList
    | AdapterDelete
    | AdapterRollback
    | AdapterMerge
)

#: Replies a streaming request may receive beyond one chunk per token (the final result, and
#: some room for a gateway that flushes text without a token).
_STREAM_REPLY_SLACK = 8
#: Replies a non-streaming request or a stats request may receive: exactly one is expected.
_SINGLE_REPLY_CAPACITY = 2


def new_request_id() -> str:
    return uuid.uuid4().hex


def resolve_timeout(timeout_s: float | None, default_s: float) -> float:
    """The timeout for one call: ``timeout_s`` or the client's default; must be positive."""
    timeout = default_s if timeout_s is None else timeout_s
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        raise InvalidRequest(
            f"timeout_s must be a positive number of seconds, got {timeout!r}", field="timeout_s"
        )
    return float(timeout)


def _check_tenant(tenant: str | None) -> None:
    if tenant is not None:
        check_id(tenant, "tenant")


def build_infer_request(
    *,
    api_key: str,
    tenant: str | None,
    prompt: str,
    adapter: str | None,
    params: SamplingParams,
    stream: bool,
    timeout_s: float,
) -> InferRequest:
    """The wire request for one generation call; ``deadline_ms`` equals the call's timeout.

    ``params`` is valid by construction; the adapter reference's length and the tenant's
    are checked here (InvalidRequest naming the field); the cluster's own limits are checked
    by the gateway.
    """
    if adapter is not None:
        check_id(adapter, "adapter")
    _check_tenant(tenant)
    return InferRequest(
        request_id=new_request_id(),
        api_key=api_key,
        prompt=prompt,
        adapter=adapter,
        sampling=Sampling.of(params),
        stream=stream,
        deadline_ms=max(1, round(timeout_s * 1000)),
        tenant=tenant,
    )


def build_adapter_push(*, api_key: str, tenant: str | None, name: str) -> AdapterPush:
    _check_tenant(tenant)
    return AdapterPush(request_id=new_request_id(), api_key=api_key, name=name, tenant=tenant)


def build_adapter_list(*, api_key: str, tenant: str | None) -> AdapterList:
    _check_tenant(tenant)
    return AdapterList(request_id=new_request_id(), api_key=api_key, tenant=tenant)


def build_adapter_delete(
    *, api_key: str, tenant: str | None, name: str, version: int | None
) -> AdapterDelete:
    """``name`` may also be ``NAME@VERSION`` (then ``version`` must be None or equal)."""
    base, at, v = name.partition("@")
    if at:
        if not (v.isascii() and v.isdigit()) or (version is not None and int(v) != version):
            raise InvalidRequest("adapter must be NAME or NAME@VERSION", field="name")
        name, version = base, int(v)
    _check_tenant(tenant)
    return AdapterDelete(
        request_id=new_request_id(), api_key=api_key, name=name, version=version, tenant=tenant
    )


def check_upload_size(config_json: bytes, weights: bytes, limit: int) -> None:
    """Refuse an upload larger than the gateway takes (``limit`` 0: the gateway did not say).

    Checked before sending: ZeroMQ would drop a too-large message before the gateway could
    answer, and the caller would only see a timeout.
    """
    size = len(config_json) + len(weights)
    if limit and size > limit:
        raise PayloadTooLarge(
            f"the adapter's files hold {size} bytes; the gateway accepts at most {limit}",
            field="weights",
        )


def request_frames(request: Request, bulk: Sequence[bytes] = ()) -> list[bytes]:
    """Frames to send; the message id is the request id, so replies can name it either way.

    ``bulk``: the raw frames an :class:`~vajra.bus.messages.AdapterPush` carries.
    """
    return encode(request, message_id=request.request_id, bulk=bulk)


def cancel_frames(request: Request) -> list[bytes] | None:
    """The frames that cancel ``request`` at the gateway, or None when it is not cancellable
    (only generations are: they hold an executor's row)."""
    if not isinstance(request, InferRequest):
        return None
    return encode(CancelRequest(request_id=request.request_id, api_key=request.api_key))


def reply_capacity(request: Request) -> int:
    """How many replies ``request`` may receive under the protocol (bounds its reply queue)."""
    if isinstance(request, InferRequest) and request.stream:
        return max(0, request.sampling.max_tokens) + _STREAM_REPLY_SLACK
    return _SINGLE_REPLY_CAPACITY
