"""Every call of the SDK as data: the request it sends and how its answer becomes its value.

:class:`~vajra.client.AsyncClient` and :class:`~vajra.client.Client` differ only in how they
move frames and keep time. What each public method sends, and what it returns for the final
answer, is built here once (a :class:`Call`), so the two clients cannot drift apart::

    call = calls.list_adapters(timeout_s)          # checks arguments, builds the request
    outcome = <send call.request, wait call.timeout_s for its final answer>
    return call.finish(outcome)                    # the public value, or ProtocolError
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from vajra.adapters.merge import check_merge_args
from vajra.adapters.versions import check_adapter_name
from vajra.bus.messages import (
    AdapterMerge,
    AdapterRollback,
    AdminReply,
    AdminRequest,
    ClusterStatusReply,
    ClusterStatusRequest,
    InferRequest,
    PingRequest,
    PongReply,
    StatsRequest,
    TenantInfo,
    WhoAmIRequest,
)
from vajra.client._choices import fan_out
from vajra.client._decoding import check_choices
from vajra.client._replies import adapter_infos, expect, single_adapter
from vajra.client._requests import (
    Request,
    build_adapter_delete,
    build_adapter_list,
    build_adapter_push,
    build_infer_request,
    new_request_id,
    resolve_timeout,
)
from vajra.client._types import (
    AdapterInfo,
    ExecutorStatus,
    InferenceResult,
    IssuedKey,
    Tenant,
)
from vajra.client._usage import UsageReport, When, usage_query, usage_report
from vajra.errors import InvalidRequest
from vajra.policies.decoding import SamplingParams

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class AdapterMetadata:
    """What a push records beside the files (docs/hot-swap.md); ``activate`` False stages the
    version without moving the active pointer."""

    activate: bool = True
    dataset_digest: str = ""
    hyperparams: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One call: its request (and the raw ``bulk`` frames it carries), the time it may take,
    and how its final answer (from :func:`~vajra.client._replies.interpret_reply`) becomes
    what the public method returns."""

    request: Request
    timeout_s: float
    finish: Callable[[object], T]
    bulk: Sequence[bytes] = ()


def _inference_result(outcome: object) -> InferenceResult:
    return expect(outcome, InferenceResult)


def _stats(outcome: object) -> dict[str, int]:
    counters: dict[str, int] = expect(outcome, dict)
    return counters


def _pong(outcome: object) -> None:
    expect(outcome, PongReply)


def _upload_limit(outcome: object) -> int:
    return expect(outcome, TenantInfo).max_adapter_bytes


def _tenant(outcome: object) -> Tenant:
    info = expect(outcome, TenantInfo)
    return Tenant(info.tenant_id, info.name)


def _executors(outcome: object) -> list[ExecutorStatus]:
    reply = expect(outcome, ClusterStatusReply)
    return [
        ExecutorStatus(*row)
        for row in zip(
            reply.executor_ids,
            reply.queue_depths,
            reply.running,
            reply.resident_adapters,
            reply.free_memory_bytes,
            strict=False,
        )
    ]


def _issued_key(outcome: object) -> IssuedKey:
    r = expect(outcome, AdminReply)
    return IssuedKey(r.tenant_id, r.name, r.api_key or "")


def _admin_done(outcome: object) -> None:
    expect(outcome, AdminReply)


class Calls:
    """Builds the calls a client makes with one API key (and tenant) and default timeout.

    Every method checks its arguments at once (InvalidRequest naming the field) and resolves
    its timeout (``timeout_s``, or the default), before anything is sent.
    """

    def __init__(self, api_key: str, tenant: str | None, timeout_s: float) -> None:
        self.api_key = api_key
        self.tenant = tenant
        self.default_timeout_s = resolve_timeout(timeout_s, timeout_s)

    def for_key(self, api_key: str, tenant: str | None) -> Calls:
        """The same calls sent with ``api_key`` and ``tenant`` instead (same default timeout)."""
        return Calls(api_key, tenant, self.default_timeout_s)

    def timeout(self, timeout_s: float | None) -> float:
        return resolve_timeout(timeout_s, self.default_timeout_s)

    # --- generation ------------------------------------------------------------------------

    def generation(
        self,
        prompt: str,
        *,
        adapter: str | None,
        params: SamplingParams,
        timeout_s: float | None,
        stream: bool,
        n: int = 1,
    ) -> tuple[list[InferRequest], float]:
        """A generation's requests (one per choice, see :func:`~vajra.client._choices.fan_out`)
        and their timeout (streams read their replies themselves)."""
        check_choices(n)
        timeout = self.timeout(timeout_s)
        request = build_infer_request(
            api_key=self.api_key,
            tenant=self.tenant,
            prompt=prompt,
            adapter=adapter,
            params=params,
            stream=stream,
            timeout_s=timeout,
        )
        return fan_out(request, n), timeout

    @staticmethod
    def infer(request: InferRequest, timeout_s: float) -> Call[InferenceResult]:
        """The call that sends one of :meth:`generation`'s requests and returns its result."""
        return Call(request, timeout_s, _inference_result)

    # --- the gateway and the caller's tenant -----------------------------------------------

    def stats(self, timeout_s: float | None) -> Call[dict[str, int]]:
        request = StatsRequest(request_id=new_request_id(), api_key=self.api_key)
        return Call(request, self.timeout(timeout_s), _stats)

    def ping(self, timeout_s: float | None) -> Call[None]:
        return Call(PingRequest(request_id=new_request_id()), self.timeout(timeout_s), _pong)

    def whoami(self, timeout_s: float | None) -> Call[Tenant]:
        request = WhoAmIRequest(request_id=new_request_id(), api_key=self.api_key)
        return Call(request, self.timeout(timeout_s), _tenant)

    def upload_limit(self, timeout_s: float) -> Call[int]:
        """The gateway's upload limit in bytes (0 when it does not say)."""
        request = WhoAmIRequest(request_id=new_request_id(), api_key=self.api_key)
        return Call(request, timeout_s, _upload_limit)

    def usage(
        self,
        tenant: str | None,
        timeout_s: float | None,
        *,
        start: When = None,
        end: When = None,
        group_by: str | None = None,
    ) -> Call[UsageReport]:
        request = usage_query(self.api_key, tenant, start, end, group_by)
        return Call(request, self.timeout(timeout_s), usage_report)

    def cluster_status(self, timeout_s: float | None) -> Call[list[ExecutorStatus]]:
        request = ClusterStatusRequest(request_id=new_request_id(), api_key=self.api_key)
        return Call(request, self.timeout(timeout_s), _executors)

    # --- adapters ----------------------------------------------------------------------------

    def push_adapter(
        self,
        config_json: bytes,
        weights: bytes,
        name: str,
        timeout_s: float | None,
        metadata: AdapterMetadata | None = None,
    ) -> Call[AdapterInfo]:
        """The upload (the caller checks its size against :meth:`upload_limit` first)."""
        request = build_adapter_push(api_key=self.api_key, tenant=self.tenant, name=name)
        if metadata is not None:
            request = msgspec.structs.replace(
                request,
                activate=metadata.activate,
                dataset_digest=metadata.dataset_digest,
                hyperparams=dict(metadata.hyperparams or {}),
                metrics=dict(metadata.metrics or {}),
            )
        return Call(request, self.timeout(timeout_s), single_adapter, (config_json, weights))

    def list_adapters(self, timeout_s: float | None) -> Call[list[AdapterInfo]]:
        request = build_adapter_list(api_key=self.api_key, tenant=self.tenant)
        return Call(request, self.timeout(timeout_s), adapter_infos)

    def versions(self, name: str, timeout_s: float | None) -> Call[list[AdapterInfo]]:
        """Every version of ``name`` (NotFoundError when the tenant has none)."""
        request = build_adapter_list(api_key=self.api_key, tenant=self.tenant)
        request = msgspec.structs.replace(request, name=check_adapter_name(name))
        return Call(request, self.timeout(timeout_s), adapter_infos)

    def rollback(self, name: str, version: int, timeout_s: float | None) -> Call[AdapterInfo]:
        """Make ``version`` of ``name`` active again (the warm way)."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InvalidRequest("version must be a positive integer", field="version")
        request = AdapterRollback(
            request_id=new_request_id(),
            api_key=self.api_key,
            name=check_adapter_name(name),
            version=version,
            tenant=self.tenant,
        )
        return Call(request, self.timeout(timeout_s), single_adapter)

    def merge(
        self,
        name: str,
        versions: tuple[int, int],
        weights: tuple[float, float],
        activate: bool,
        timeout_s: float | None,
    ) -> Call[AdapterInfo]:
        """Register the weighted sum of two versions of ``name`` (see vajra.adapters.merge)."""
        pair, w = check_merge_args(versions, weights)
        request = AdapterMerge(
            request_id=new_request_id(),
            api_key=self.api_key,
            name=check_adapter_name(name),
            versions=list(pair),
            weights=list(w),
            tenant=self.tenant,
            activate=bool(activate),
        )
        return Call(request, self.timeout(timeout_s), single_adapter)

    def delete_adapter(
        self, name: str, version: int | None, timeout_s: float | None
    ) -> Call[list[AdapterInfo]]:
        timeout = self.timeout(timeout_s)
        request = build_adapter_delete(
            api_key=self.api_key, tenant=self.tenant, name=name, version=version
        )
        return Call(request, timeout, adapter_infos)

    # --- administration (this client's API key must be the cluster's admin key) -------------

    def _admin(
        self,
        action: str,
        finish: Callable[[object], T],
        *,
        tenant: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None,
    ) -> Call[T]:
        timeout = self.timeout(timeout_s)
        request = AdminRequest(
            request_id=new_request_id(),
            admin_key=self.api_key,
            action=action,
            tenant=tenant,
            api_key=api_key,
        )
        return Call(request, timeout, finish)

    def create_tenant(self, name: str, timeout_s: float | None) -> Call[IssuedKey]:
        return self._admin("create_tenant", _issued_key, tenant=name, timeout_s=timeout_s)

    def create_api_key(self, tenant: str, timeout_s: float | None) -> Call[IssuedKey]:
        return self._admin("create_key", _issued_key, tenant=tenant, timeout_s=timeout_s)

    def revoke_api_key(self, api_key: str, timeout_s: float | None) -> Call[None]:
        return self._admin("revoke_key", _admin_done, api_key=api_key, timeout_s=timeout_s)

    def delete_tenant(self, tenant: str, timeout_s: float | None) -> Call[None]:
        return self._admin("delete_tenant", _admin_done, tenant=tenant, timeout_s=timeout_s)
