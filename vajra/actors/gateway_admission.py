"""The gateway's admission of generation requests: from a client's ``InferRequest`` to the
``InferWork`` queued for the scheduler.

Data flows left to right::

    InferRequest ─▶ validate ─▶ shed ─▶ API key ─▶ tenant limits ─▶ adapter ─▶ InferWork
                   (request_rules) (draining,  (cache, or one    (rate,        (cache, or a
                                    max_inflight) lookup per key)  in flight)    lookup task)

Validation is :mod:`vajra.policies.request_rules` against the ``[gateway]`` limits. Redis is
consulted only on a cache miss, in a task of its own, off the hot path: one lookup per key
however many requests wait for it, and lookups in flight are bounded (``overloaded`` beyond).
A request refused at any step is answered at once with the typed error; its tenant's in-flight
slot, once taken, is released by whoever holds the request last (this desk until dispatch,
then :class:`~vajra.actors.gateway_replies.ReplyRouter`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import trio

from vajra.actors.base import now_ms
from vajra.actors.gateway_adapters import AdapterDesk
from vajra.actors.gateway_auth import MAX_KEY_CHARS, AuthCache
from vajra.actors.gateway_protocol import ClientProtocol
from vajra.actors.gateway_replies import ReplyRouter
from vajra.adapters.versions import ResolvedAdapter, not_found, parse_adapter_ref
from vajra.bus.codec import encode
from vajra.bus.messages import InferRequest, InferWork
from vajra.bus.outbox import Outbox
from vajra.config import VajraConfig
from vajra.errors import AuthError, InvalidRequest, OverloadedError, UnavailableError, VajraError
from vajra.policies.limits import TenantLimits
from vajra.policies.request_rules import (
    RequestBounds,
    check_deadline,
    check_id,
    check_prompt,
    check_sampling,
)
from vajra.state import TenantRecord

log = logging.getLogger("vajra.gateway")


class Admission:
    """See the module docstring. ``accepting()`` is False once the gateway drains;
    ``spawn(fn, *args)`` starts a task in the gateway's nursery."""

    def __init__(
        self,
        cfg: VajraConfig,
        *,
        incarnation: str,
        clients: ClientProtocol,
        replies: ReplyRouter,
        auth: AuthCache,
        limits: TenantLimits,
        adapters: AdapterDesk,
        work_out: Outbox,
        counters: Counter[str],
        accepting: Callable[[], bool],
        spawn: Callable[..., None],
    ) -> None:
        self.cfg = cfg
        self.gcfg = g = cfg.gateway
        self.bounds = RequestBounds(
            max_prompt_chars=g.max_prompt_chars,
            max_tokens_limit=g.max_tokens_limit,
            max_stop_strings=g.max_stop_strings,
            max_stop_chars=g.max_stop_chars,
            max_deadline_ms=g.max_deadline_ms,
        )
        self.incarnation = incarnation
        self.clients = clients
        self.replies = replies
        self.auth = auth
        self.limits = limits
        self.adapters = adapters
        self.work_out = work_out
        self.counters = counters
        self._accepting = accepting
        self._spawn = spawn
        # Requests waiting for their key's lookup (one lookup per key), and how many in all.
        self._awaiting_key: dict[str, list[tuple[bytes, InferRequest]]] = {}
        self._awaiting = 0

    def validate(self, req: InferRequest) -> None:
        """Raise the typed error for the first field of ``req`` out of bounds."""
        check_id(req.request_id, "request_id")
        if not req.api_key:
            raise AuthError("missing API key")
        check_prompt(req.prompt, self.bounds)
        check_sampling(req.sampling.params(), self.bounds)
        check_deadline(req.deadline_ms, self.bounds)
        if req.adapter is not None:
            check_id(req.adapter, "adapter")
            parse_adapter_ref(req.adapter)  # NAME or NAME@VERSION, else InvalidRequest
        if req.tenant is not None:
            check_id(req.tenant, "tenant")

    async def on_infer(self, identity: bytes, req: InferRequest) -> None:
        """Admit ``req`` now (a cached key), after its key's lookup, or answer why not."""
        try:
            self.validate(req)
        except VajraError as exc:
            await self.clients.reply_error(identity, req.request_id, exc)
            return
        if not self._accepting():
            await self.clients.reply_error(
                identity, req.request_id, UnavailableError("the gateway is shutting down")
            )
            return
        if self.replies.inflight >= self.gcfg.max_inflight:
            self.counters["overloaded"] += 1
            await self.clients.reply_error(
                identity,
                req.request_id,
                OverloadedError(
                    f"more than {self.gcfg.max_inflight} requests in flight; retry later"
                ),
            )
            return
        entry = self.auth.get(req.api_key)
        if entry is not None:
            if self.auth.take_refresh(req.api_key, entry):
                # Ahead of expiry, so a busy key never misses the cache.
                self._spawn(self._refresh_key, req.api_key)
            await self._admit(identity, req, entry.tenant)
        elif len(req.api_key) > MAX_KEY_CHARS:
            await self._admit(identity, req, None)
        elif (waiting := self._awaiting_key.get(req.api_key)) is not None:
            # A lookup of this key is under way: wait for it (no lookup of our own).
            if self._awaiting >= self.gcfg.max_inflight:
                await self._shed_lookup(identity, req)
            else:
                waiting.append((identity, req))
                self._awaiting += 1
        elif self._awaiting >= self.gcfg.max_inflight or not self.auth.reserve(identity):
            await self._shed_lookup(identity, req)
        else:
            self.counters["auth_cache_misses"] += 1
            self._awaiting_key[req.api_key] = [(identity, req)]
            self._awaiting += 1
            self._spawn(self._authenticate_then_admit, identity, req.api_key)

    async def _shed_lookup(self, identity: bytes, req: InferRequest) -> None:
        self.counters["overloaded"] += 1
        await self.clients.reply_error(
            identity,
            req.request_id,
            OverloadedError("too many API key lookups in flight; retry later"),
        )

    # --- the API key ------------------------------------------------------------------------

    async def _refresh_key(self, api_key: str) -> None:
        self.counters["auth_refreshes"] += 1
        try:
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                await self.auth.lookup(api_key, refresh=True)
        except (VajraError, trio.TooSlowError) as exc:
            log.warning("auth refresh failed: %s", exc)  # the entry still expires on time

    async def _authenticate_then_admit(self, identity: bytes, api_key: str) -> None:
        """Look ``api_key`` up (a lookup ``identity`` reserved), then admit every request that
        waited for it; one task per key, however many requests wait."""
        tenant: TenantRecord | None = None
        failed = False
        try:
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                tenant = await self.auth.lookup(api_key)
        except (VajraError, trio.TooSlowError) as exc:
            log.warning("auth lookup failed: %s", exc)
            failed = True
        finally:
            self.auth.release(identity)
            waiting = self._awaiting_key.pop(api_key, [])
            self._awaiting -= len(waiting)
        for ident, req in waiting:
            if failed:
                await self.clients.reply_error(
                    ident, req.request_id, UnavailableError("cluster state is unreachable; retry")
                )
            else:
                await self._admit(ident, req, tenant)
        await self.work_out.flush()

    # --- the tenant and its adapter ---------------------------------------------------------

    async def _admit(self, identity: bytes, req: InferRequest, tenant: TenantRecord | None) -> None:
        if tenant is None:
            self.counters["auth_failed"] += 1
            await self.clients.reply_error(identity, req.request_id, AuthError("invalid API key"))
            return
        if req.tenant is not None and req.tenant not in (tenant.tenant_id, tenant.name):
            # Same answer whether or not the named tenant exists: names must not leak.
            await self.clients.reply_error(
                identity,
                req.request_id,
                InvalidRequest(f"unknown tenant {req.tenant!r}", field="tenant"),
            )
            return
        refused = self.limits.admit(tenant.tenant_id, time.monotonic(), generation=True)
        if refused is not None:
            self.counters[f"tenant_{refused.code.value}"] += 1
            await self.clients.reply_error(identity, req.request_id, refused)
            return
        handed_on = False
        try:
            handed_on = await self._route(identity, req, tenant)
        finally:
            if not handed_on:
                self.limits.release(tenant.tenant_id)

    async def _route(self, identity: bytes, req: InferRequest, tenant: TenantRecord) -> bool:
        """Resolve the request's adapter (cached, or in a task) and dispatch it. True when the
        request was dispatched or handed to that task, which then owns its in-flight slot."""
        resolved: ResolvedAdapter | None = None
        if req.adapter is not None:
            hit = self.adapters.cached(tenant.tenant_id, req.adapter)
            if hit is None:  # not cached: look it up off the hot path
                self._spawn(self._resolve_then_dispatch, identity, req, tenant)
                return True
            resolved = hit[0]
            if resolved is None:
                await self.clients.reply_error(identity, req.request_id, not_found(req.adapter))
                return False
        self._dispatch(identity, req, tenant, resolved)
        return True

    async def _resolve_then_dispatch(
        self, identity: bytes, req: InferRequest, tenant: TenantRecord
    ) -> None:
        """Resolve ``req.adapter`` for the tenant in Redis (a cache miss), then dispatch."""
        assert req.adapter is not None
        dispatched = False
        try:
            try:
                resolved = await self.adapters.resolve(tenant.tenant_id, req.adapter)
            except VajraError as exc:
                if not isinstance(exc, InvalidRequest):
                    log.warning("adapter lookup failed: %s", exc)
                await self.clients.reply_error(identity, req.request_id, exc)
                return
            if resolved is None:
                await self.clients.reply_error(identity, req.request_id, not_found(req.adapter))
                return
            self._dispatch(identity, req, tenant, resolved)
            dispatched = True
        finally:
            if not dispatched:
                self.limits.release(tenant.tenant_id)
        await self.work_out.flush()

    def _dispatch(
        self,
        identity: bytes,
        req: InferRequest,
        tenant: TenantRecord,
        resolved: ResolvedAdapter | None,
    ) -> None:
        """Track the admitted request and queue it, with its resolved adapter version, for the
        scheduler. The caller flushes ``work_out`` (the frontend loop once per pass)."""
        internal_id = self.replies.track(identity, req, tenant.tenant_id)
        received = now_ms()
        work = InferWork(
            request_id=internal_id,
            tenant_id=tenant.tenant_id,
            prompt=req.prompt,
            adapter=req.adapter,
            sampling=req.sampling,
            stream=req.stream,
            deadline_unix_ms=received + req.deadline_ms,
            gateway_id=self.gcfg.gateway_id,
            received_unix_ms=received,
            adapter_version=resolved.version if resolved else None,
            adapter_digest=resolved.digest if resolved else None,
            adapter_object_key=resolved.object_key if resolved else None,
            adapter_bytes=resolved.size_bytes if resolved else 0,
            gateway_incarnation=self.incarnation,
        )
        if req.stream:
            self.replies.keep_for_retry(internal_id, work)
        self.work_out.add(encode(work, message_id=internal_id))
