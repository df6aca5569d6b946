"""The gateway's query desk: tenant queries (who am I, usage), operator views (counters,
executors) and tenant/key administration. Raises VajraErrors; sends nothing.

Every tenant query spends one token of the tenant's rate limit. Gateway-wide views need the
admin key or a tenant's key. Deleting a tenant revokes its keys at once (this gateway's auth
and adapter caches forget it) and deletes its adapter files once its requests in flight
here have ended (bounded by the longest deadline).
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vajra.actors.base import wait_until
from vajra.actors.gateway_adapters import AdapterDesk
from vajra.actors.gateway_auth import AuthCache
from vajra.bus.messages import (
    AdminReply,
    AdminRequest,
    ClusterStatusReply,
    ClusterStatusRequest,
    Message,
    StatsReply,
    StatsRequest,
    TenantInfo,
    UsageQuery,
    UsageReply,
    UsageRowWire,
    WhoAmIRequest,
)
from vajra.config import VajraConfig
from vajra.errors import AuthError, InvalidRequest, NotFoundError, VajraError
from vajra.policies.billing import GROUP_BY
from vajra.policies.limits import TenantLimits
from vajra.state import ClusterState, OffLoop, TenantRecord
from vajra.storage import ObjectStore, adelete_tenant_objects

log = logging.getLogger("vajra.gateway")

Query = WhoAmIRequest | UsageQuery | AdminRequest | ClusterStatusRequest | StatsRequest


class QueryDesk:
    """See the module docstring. ``stats()`` gives the gateway's counters for a StatsRequest;
    ``spawn(fn, *args)`` starts a background task in the gateway's nursery."""

    def __init__(
        self,
        cfg: VajraConfig,
        state: ClusterState,
        *,
        auth: AuthCache,
        limits: TenantLimits,
        adapters: AdapterDesk,
        store: ObjectStore,
        counters: Counter[str],
        stats: Callable[[], dict[str, int]],
        spawn: Callable[..., None],
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.redis = OffLoop()  # Redis calls, off the event loop
        self.auth = auth
        self.limits = limits
        self.adapters = adapters
        self.store = store
        self.counters = counters
        self._stats = stats
        self._spawn: Callable[[Callable[..., Awaitable[Any]], str], None] = spawn

    async def tenant_of(self, api_key: str) -> TenantRecord:
        """The key's tenant (through the auth cache), charged one token of its rate limit;
        AuthError for an unknown or revoked key, RateLimited over the limit."""
        tenant = await self.auth.lookup(api_key)
        if tenant is None:
            self.counters["auth_failed"] += 1
            raise AuthError("invalid API key")
        refused = self.limits.admit(tenant.tenant_id, time.monotonic(), generation=False)
        if refused is not None:
            self.counters[f"tenant_{refused.code.value}"] += 1
            raise refused
        return tenant

    async def _check_operator(self, api_key: str) -> None:
        """Gateway-wide views (counters, executors) need the admin key or a tenant's key."""
        admin = self.cfg.http.admin_key
        if admin and hmac.compare_digest(api_key.encode(), admin.encode()):
            return
        await self.tenant_of(api_key)

    async def answer(self, msg: Query) -> Message:
        """The reply to ``msg``, or the VajraError that answers it."""
        if isinstance(msg, StatsRequest):
            await self._check_operator(msg.api_key)
            self.counters["stats_requests"] += 1
            return StatsReply(msg.request_id, "gateway", self._stats())
        if isinstance(msg, WhoAmIRequest):
            t = await self.tenant_of(msg.api_key)
            return TenantInfo(
                msg.request_id, t.tenant_id, t.name, self.cfg.adapters.max_adapter_bytes
            )
        if isinstance(msg, UsageQuery):
            return await self._usage(msg)
        if isinstance(msg, ClusterStatusRequest):
            await self._check_operator(msg.api_key)
            beats = await self.redis.run(self.state.heartbeats.list)
            return ClusterStatusReply(
                msg.request_id,
                [hb.executor_id for hb in beats],
                [hb.queue_depth for hb in beats],
                [hb.running for hb in beats],
                [len(hb.resident_adapters) for hb in beats],
                [hb.free_memory_bytes for hb in beats],
            )
        return await self._admin(msg)

    async def _usage(self, msg: UsageQuery) -> UsageReply:
        """A tenant's usage totals and the day buckets in ``[start, end)``.

        A tenant's key sees only its own tenant (naming any other: ``not_found``, whether or
        not it exists); the admin key (``http.admin_key``) must name the tenant, by id or name.
        """
        _check_usage_query(msg)
        admin = self.cfg.http.admin_key
        if admin and hmac.compare_digest(msg.api_key.encode(), admin.encode()):
            ref = msg.tenant or ""
            if not ref:
                raise InvalidRequest("the admin key must name a tenant", field="tenant")
            t = await self.redis.run(self.state.tenants.get_by_name, ref)
            t = t or await self.redis.run(self.state.tenants.get, ref)
            if t is None:
                raise NotFoundError(f"no tenant {ref!r}", field="tenant_id")
        else:
            t = await self.tenant_of(msg.api_key)
            if msg.tenant is not None and msg.tenant not in (t.tenant_id, t.name):
                # Same answer whether or not the named tenant exists: ids must not leak.
                raise NotFoundError(f"no tenant {msg.tenant!r}", field="tenant_id")
        u = await self.redis.run(self.state.usage.get, t.tenant_id)
        rows = await self.redis.run(
            self.state.usage.rows, t.tenant_id, start_ms=msg.start_unix_ms, end_ms=msg.end_unix_ms
        )
        return UsageReply(
            msg.request_id,
            t.tenant_id,
            t.name,
            u.requests,
            u.gpu_ms,
            u.prompt_tokens,
            u.completion_tokens,
            billed_ms=u.billed_ms,
            gradients=u.gradients,
            rows=[UsageRowWire(**dataclasses.asdict(r)) for r in rows],
            group_by=msg.group_by,
        )

    async def _admin(self, msg: AdminRequest) -> AdminReply:
        """Tenant and key administration under the admin key (``http.admin_key``).

        Revoking a key (or deleting its tenant) drops it from this gateway's auth cache, so
        the key's next request is refused. A key revoked elsewhere (``vajra tenant
        revoke-key`` writes Redis directly) stays usable for up to ``auth_cache_ttl_s``.
        """
        expected = self.cfg.http.admin_key
        if not expected:
            raise AuthError("the admin API is disabled: set http.admin_key")
        if not hmac.compare_digest(msg.admin_key.encode(), expected.encode()):
            self.counters["admin_auth_failed"] += 1
            raise AuthError("invalid admin key")
        if msg.action == "create_tenant":
            record, key = await self.redis.run(self.state.tenants.create, msg.tenant or "")
            return AdminReply(msg.request_id, msg.action, record.tenant_id, record.name, key)
        if msg.action in ("create_key", "delete_tenant"):
            ref = msg.tenant or ""
            t = await self.redis.run(self.state.tenants.get_by_name, ref)
            t = t or await self.redis.run(self.state.tenants.get, ref)
            if t is None:
                raise NotFoundError(f"no tenant {ref!r}", field="tenant")
            if msg.action == "create_key":
                key = await self.redis.run(self.state.api_keys.create, t.tenant_id)
                return AdminReply(msg.request_id, msg.action, t.tenant_id, t.name, key)
            self.auth.begin_revocation()
            await self.redis.run(self.state.tenants.delete, t.tenant_id)
            self.auth.forget_tenant(t.tenant_id)
            self.adapters.forget_tenant(t.tenant_id)
            self._spawn(self._delete_objects_when_idle, t.tenant_id)
            return AdminReply(msg.request_id, msg.action, t.tenant_id, t.name)
        if msg.action == "revoke_key":
            if not msg.api_key:
                raise InvalidRequest("api_key is required", field="api_key")
            self.auth.begin_revocation()
            revoked = await self.redis.run(self.state.api_keys.revoke, msg.api_key)
            self.auth.forget_key(msg.api_key)
            if not revoked:
                raise NotFoundError("no such API key", field="api_key")
            return AdminReply(msg.request_id, msg.action)
        raise InvalidRequest(f"unknown admin action {msg.action!r}", field="action")

    async def _delete_objects_when_idle(self, tenant_id: str) -> None:
        """Once a deleted tenant's requests in flight here have ended (bounded by the longest
        deadline), purge what they may have written meanwhile and delete its adapter files."""
        with trio.move_on_after(self.cfg.gateway.max_deadline_ms / 1000.0):
            await wait_until(lambda: self.limits.inflight(tenant_id) == 0, poll_s=0.2)
        try:
            with trio.fail_after(self.cfg.storage.s3_op_timeout_s):
                # Again: a push that landed meanwhile.
                await self.redis.run(self.state.tenants.delete, tenant_id)
                removed = await adelete_tenant_objects(self.store, tenant_id)
        except (VajraError, trio.TooSlowError) as exc:
            log.error("deleting tenant %s's adapter files failed: %s", tenant_id, exc)
            return
        log.info("tenant %s deleted: %d adapter files removed", tenant_id, removed)


def _check_usage_query(msg: UsageQuery) -> None:
    """InvalidRequest for a range or grouping no usage query can have."""
    for name in ("start_unix_ms", "end_unix_ms"):
        value = getattr(msg, name)
        if value is not None and (isinstance(value, bool) or value < 0):
            raise InvalidRequest(f"{name} must be a non-negative integer", field=name)
    start, end = msg.start_unix_ms, msg.end_unix_ms
    if start is not None and end is not None and end <= start:
        raise InvalidRequest("end_unix_ms must be after start_unix_ms", field="end_unix_ms")
    if msg.group_by is not None and msg.group_by not in GROUP_BY:
        raise InvalidRequest(f"group_by must be one of {', '.join(GROUP_BY)}", field="group_by")
