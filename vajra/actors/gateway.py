"""The gateway: client connections, API-key auth, validation, load shedding, reply routing.

Data flows left to right::

    clients ─ROUTER(frontend)─▶ gateway ─DEALER─▶ scheduler ─▶ executor
    clients ◀─ROUTER(frontend)─ gateway ◀─ROUTER(backend)─ executors (chunks, results, errors)
                                        ◀─DEALER─ scheduler (errors: no executor, executor lost)

Every request gets an internal id (``<gateway_id>-<seq>``) so a client can neither collide with
nor read another client's replies; replies are re-addressed to the client's own request id.
Redis is consulted only on an auth-cache miss, in a worker thread, off the hot path.

Errors: every frame from a client is answered — a reply, or an ``ErrorReply`` with a typed
code — and malformed ones are counted; nothing a client sends can stop the gateway.
Cancellation: :meth:`drain` first refuses new requests, then waits (bounded) for the
requests in flight to be answered.
"""

from __future__ import annotations

import heapq
import hmac
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple

import trio
import zmq

from vajra.actors.base import error_frames, new_context, now_ms, stats_frames, wait_until
from vajra.actors.gateway_adapters import AdapterDesk, AdapterOp
from vajra.adapters.registry import (
    AsyncAdapterRegistry,
    ResolvedAdapter,
    not_found,
    parse_adapter_ref,
)
from vajra.bus.codec import DecodeError, decode, decode_many, encode
from vajra.bus.messages import (
    AdapterPush,
    AdminReply,
    AdminRequest,
    ClusterStatusReply,
    ClusterStatusRequest,
    ErrorReply,
    InferRequest,
    InferResult,
    InferWork,
    Message,
    StatsRequest,
    TenantInfo,
    TokenChunk,
    UsageQuery,
    UsageReply,
    WhoAmIRequest,
)
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig
from vajra.errors import (
    AuthError,
    InvalidRequest,
    NotFoundError,
    OverloadedError,
    TimeoutError,
    UnavailableError,
    VajraError,
)
from vajra.state import AsyncClusterState, TenantRecord
from vajra.storage import ObjectStore, open_store

log = logging.getLogger("vajra.gateway")

_MAX_ID_CHARS = 128
_MAX_SEED = 2**63 - 1
_MAX_QUERIES = 256  # tenant queries and admin requests in flight at once

Query = WhoAmIRequest | UsageQuery | AdminRequest | ClusterStatusRequest


class _AuthEntry(NamedTuple):
    """A cached key lookup: used until ``expires``; refreshed in the background after ``stale``."""

    tenant: TenantRecord | None
    expires: float  # time.monotonic()
    stale: float


@dataclass(slots=True)
class _Pending:
    identity: bytes
    client_request_id: str
    deadline: float  # trio clock
    stream: bool
    tenant_id: str


class Gateway:
    """See the module docstring. Construct, then ``await nursery.start(gateway.run)``."""

    name = "gateway"

    def __init__(
        self,
        cfg: VajraConfig,
        state: AsyncClusterState,
        *,
        registry: AsyncAdapterRegistry | None = None,
        store: ObjectStore | None = None,
    ) -> None:
        """``registry`` and ``store`` default to ones built from ``cfg`` (owned and closed here)."""
        self.cfg = cfg
        self.gcfg = cfg.gateway
        self.state = state
        self.counters: Counter[str] = Counter()
        self._pending: dict[str, _Pending] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._seq = itertools.count(1)
        self._auth_cache: dict[str, _AuthEntry] = {}
        self._auth_limiter = trio.CapacityLimiter(64)
        self._auth_inflight: dict[str, trio.Event] = {}
        # Bumped by every revocation: an auth lookup that began before one is not cached.
        self._auth_epoch = 0
        self._queries = 0
        # The adapter registry and object store (adapter push/list/delete, name resolution).
        self._owns_registry = registry is None and bool(cfg.cluster.redis_url)
        self.registry = registry
        if self._owns_registry:
            self.registry = AsyncAdapterRegistry.from_url(cfg.cluster.redis_url)
        self._owns_store = store is None
        self.store: ObjectStore = store if store is not None else open_store(cfg)
        self.adapters = AdapterDesk(cfg, self.registry, self.store)
        self._pushes = 0
        self._adapter_ops = 0
        self._nursery: trio.Nursery | None = None
        self._accepting = True
        self._ctx = new_context()
        # Each frame (ZeroMQ checks frames one by one) may be an adapter file; larger peers
        # are disconnected by ZeroMQ before they are buffered in full.
        self.frontend: ZSocket = open_socket(
            self._ctx,
            zmq.ROUTER,
            high_water_mark=cfg.bus.high_water_mark,
            max_message_bytes=max(cfg.bus.max_body_bytes, cfg.adapters.max_adapter_bytes) + 65_536,
        )
        self.backend: ZSocket = open_socket(
            self._ctx, zmq.ROUTER, high_water_mark=cfg.bus.high_water_mark, handover=True
        )
        self.scheduler: ZSocket = open_socket(
            self._ctx,
            zmq.DEALER,
            identity=self.gcfg.gateway_id.encode(),
            high_water_mark=cfg.bus.high_water_mark,
        )
        # Admitted requests for the scheduler, sent together at the end of each pass.
        self._work_out = Outbox(self.scheduler)
        # Replies for clients from one pass over the executors' messages, sent in one go.
        self._client_out = Outbox(self.frontend, pack=False)
        self.address = ""
        self.backend_address = ""

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the client-facing address, and serve until cancelled."""
        c = self.cfg.cluster
        try:
            self.address = self.frontend.bind(c.gateway_address)
            self.backend_address = self.backend.bind(c.gateway_backend_address)
            self.scheduler.connect(c.scheduler_address)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._serve_frontend, nursery)
                nursery.start_soon(self._serve_replies, self.backend, True)
                nursery.start_soon(self._serve_replies, self.scheduler, False)
                nursery.start_soon(self._expire_deadlines)
                task_status.started(self.address)
        finally:
            self._nursery = None
            for s in (self.frontend, self.backend, self.scheduler):
                s.close()
            self._ctx.term()
            if self._owns_registry and self.registry is not None:
                self.registry.sync.close()
            if self._owns_store:
                with trio.CancelScope(shield=True), trio.move_on_after(6.0):
                    await trio.to_thread.run_sync(self.store.close)

    async def drain(self) -> None:
        """Refuse new requests, then wait (bounded) until those in flight are answered."""
        self._accepting = False
        with trio.move_on_after(self.cfg.executor.drain_timeout_s + 1.0):
            await wait_until(lambda: not self._pending)

    # --- client side ----------------------------------------------------------------------

    async def _serve_frontend(self, nursery: trio.Nursery) -> None:
        batch_size = self.cfg.bus.recv_batch
        while True:
            for frames in await self.frontend.recv_batch(batch_size):
                await self._on_client_frames(frames, nursery)
            await self._work_out.flush()

    async def _on_client_frames(self, frames: list[bytes], nursery: trio.Nursery) -> None:
        identity = frames[0]
        try:
            env = decode(
                frames[1:],
                max_body_bytes=self.cfg.bus.max_body_bytes,
                max_bulk_bytes=self.cfg.adapters.max_adapter_bytes,
            )
        except DecodeError as exc:
            self.counters["malformed_frames"] += 1
            await self._reply_error(identity, exc.request_id or exc.message_id, exc)
            return
        msg = env.message
        if isinstance(msg, AdapterOp):
            await self._on_adapter_op(identity, msg, env.bulk, nursery)
            return
        if isinstance(msg, InferRequest):
            self.counters["requests"] += 1
            await self._on_infer(identity, msg, nursery)
        elif isinstance(msg, StatsRequest):
            self.counters["stats_requests"] += 1
            self.counters["inflight"] = len(self._pending)
            await self.frontend.send(
                [identity, *stats_frames(msg.request_id, self.name, self.counters)]
            )
        elif isinstance(msg, Query):
            self.counters["queries"] += 1
            if self._queries >= _MAX_QUERIES:
                self.counters["overloaded"] += 1
                await self._reply_error(
                    identity, msg.request_id, OverloadedError("too many queries in flight")
                )
            else:
                self._queries += 1
                nursery.start_soon(self._on_query, identity, msg)
        else:
            self.counters["malformed_frames"] += 1
            await self._reply_error(
                identity,
                getattr(msg, "request_id", ""),
                DecodeError(f"the gateway does not accept {msg.KIND!r} messages", field="kind"),
            )

    async def _on_infer(self, identity: bytes, req: InferRequest, nursery: trio.Nursery) -> None:
        try:
            self._validate(req)
        except VajraError as exc:
            await self._reply_error(identity, req.request_id, exc)
            return
        if not self._accepting:
            await self._reply_error(
                identity, req.request_id, UnavailableError("the gateway is shutting down")
            )
            return
        if len(self._pending) >= self.gcfg.max_inflight:
            self.counters["overloaded"] += 1
            await self._reply_error(
                identity,
                req.request_id,
                OverloadedError(
                    f"more than {self.gcfg.max_inflight} requests in flight; retry later"
                ),
            )
            return
        cached = self._auth_cache.get(req.api_key)
        now = time.monotonic()
        if cached is not None and cached.expires > now:
            if cached.stale <= now:
                # Refresh ahead of expiry, so a busy key never misses the cache; one refresh
                # at a time (the entry stops counting as stale until it is replaced).
                self._auth_cache[req.api_key] = cached._replace(stale=cached.expires)
                nursery.start_soon(self._refresh_key, req.api_key)
            await self._admit(identity, req, cached.tenant)
        else:
            self.counters["auth_cache_misses"] += 1
            nursery.start_soon(self._authenticate_then_admit, identity, req)

    async def _refresh_key(self, api_key: str) -> None:
        self.counters["auth_refreshes"] += 1
        try:
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                await self._lookup_key(api_key, refresh=True)
        except (VajraError, trio.TooSlowError) as exc:
            log.warning("auth refresh failed: %s", exc)  # the entry still expires on time

    async def _authenticate_then_admit(self, identity: bytes, req: InferRequest) -> None:
        try:
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                tenant = await self._lookup_key(req.api_key)
        except (VajraError, trio.TooSlowError) as exc:
            log.warning("auth lookup failed: %s", exc)
            await self._reply_error(
                identity, req.request_id, UnavailableError("cluster state is unreachable; retry")
            )
            return
        await self._admit(identity, req, tenant)
        await self._work_out.flush()

    async def _lookup_key(self, api_key: str, *, refresh: bool = False) -> TenantRecord | None:
        """The key's tenant through the auth cache: one Redis lookup per key at a time.

        Requests that miss while a lookup of the same key is in flight wait for it rather
        than each asking Redis. ``refresh``: look it up even if the cached entry is fresh.
        An entry lives ``auth_cache_ttl_s`` (half that for an unknown key) and is refreshed
        in the background once half its life has passed (see ``_on_infer``).
        """
        cached = self._auth_cache.get(api_key)
        if not refresh and cached is not None and cached.expires > time.monotonic():
            return cached.tenant
        pending = self._auth_inflight.get(api_key)
        if pending is not None:
            await pending.wait()
            cached = self._auth_cache.get(api_key)
            if cached is not None:
                return cached.tenant
        done = self._auth_inflight[api_key] = trio.Event()
        try:
            epoch = self._auth_epoch
            async with self._auth_limiter:
                tenant = await self.state.authenticate(api_key)
            ttl = (
                self.gcfg.auth_cache_ttl_s if tenant is not None else self.gcfg.auth_cache_ttl_s / 2
            )
            if len(self._auth_cache) > 100_000:
                self._auth_cache.clear()
            if epoch == self._auth_epoch:
                now = time.monotonic()
                self._auth_cache[api_key] = _AuthEntry(tenant, now + ttl, now + ttl / 2)
            return tenant
        finally:
            if self._auth_inflight.get(api_key) is done:
                del self._auth_inflight[api_key]
            done.set()

    async def _admit(self, identity: bytes, req: InferRequest, tenant: TenantRecord | None) -> None:
        if tenant is None:
            self.counters["auth_failed"] += 1
            await self._reply_error(identity, req.request_id, AuthError("invalid API key"))
            return
        if req.tenant is not None and req.tenant not in (tenant.tenant_id, tenant.name):
            # Same answer whether or not the named tenant exists: names must not leak.
            await self._reply_error(
                identity,
                req.request_id,
                InvalidRequest(f"unknown tenant {req.tenant!r}", field="tenant"),
            )
            return
        resolved: ResolvedAdapter | None = None
        if req.adapter is not None:
            hit = self.adapters.cached(tenant.tenant_id, req.adapter)
            if hit is None:  # not cached: look it up off the hot path
                assert self._nursery is not None
                self._nursery.start_soon(self._resolve_then_dispatch, identity, req, tenant)
                return
            resolved = hit[0]
            if resolved is None:
                await self._reply_error(identity, req.request_id, not_found(req.adapter))
                return
        self._dispatch(identity, req, tenant, resolved)

    def _dispatch(
        self,
        identity: bytes,
        req: InferRequest,
        tenant: TenantRecord,
        resolved: ResolvedAdapter | None,
    ) -> None:
        """Queue the admitted request, with its resolved adapter version, for the scheduler.

        The caller flushes ``_work_out`` (the frontend loop once per pass).
        """
        internal_id = f"{self.gcfg.gateway_id}-{next(self._seq)}"
        deadline = trio.current_time() + req.deadline_ms / 1000.0
        self._pending[internal_id] = _Pending(
            identity, req.request_id, deadline, req.stream, tenant.tenant_id
        )
        heapq.heappush(self._deadlines, (deadline, internal_id))
        received = now_ms()
        work = InferWork(
            request_id=internal_id,
            tenant_id=tenant.tenant_id,
            prompt=req.prompt,
            adapter=req.adapter,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            seed=req.seed,
            stream=req.stream,
            deadline_unix_ms=received + req.deadline_ms,
            gateway_id=self.gcfg.gateway_id,
            received_unix_ms=received,
            adapter_version=resolved.version if resolved else None,
            adapter_digest=resolved.digest if resolved else None,
            adapter_object_key=resolved.object_key if resolved else None,
        )
        self._work_out.add(encode(work, message_id=internal_id))

    def _validate(self, req: InferRequest) -> None:
        g = self.gcfg
        if not req.request_id or len(req.request_id) > _MAX_ID_CHARS:
            raise InvalidRequest(
                f"request_id must be 1..{_MAX_ID_CHARS} characters", field="request_id"
            )
        if not req.api_key:
            raise AuthError("missing API key")
        if not req.prompt:
            raise InvalidRequest("prompt must not be empty", field="prompt")
        if len(req.prompt) > g.max_prompt_chars:
            raise InvalidRequest(
                f"prompt has {len(req.prompt)} characters; the limit is {g.max_prompt_chars}",
                field="prompt",
            )
        if not 1 <= req.max_tokens <= g.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens must be between 1 and {g.max_tokens_limit}", field="max_tokens"
            )
        if not (math.isfinite(req.temperature) and 0.0 <= req.temperature <= 5.0):
            raise InvalidRequest("temperature must be between 0 and 5", field="temperature")
        if not (math.isfinite(req.top_p) and 0.0 < req.top_p <= 1.0):
            raise InvalidRequest("top_p must be in (0, 1]", field="top_p")
        if len(req.stop) > g.max_stop_strings or any(
            not s or len(s) > g.max_stop_chars for s in req.stop
        ):
            raise InvalidRequest(
                f"stop takes at most {g.max_stop_strings} non-empty strings of at most "
                f"{g.max_stop_chars} characters",
                field="stop",
            )
        if req.seed is not None and not 0 <= req.seed <= _MAX_SEED:
            raise InvalidRequest("seed must be between 0 and 2**63-1", field="seed")
        if not 1 <= req.deadline_ms <= g.max_deadline_ms:
            raise InvalidRequest(
                f"deadline_ms must be between 1 and {g.max_deadline_ms}", field="deadline_ms"
            )
        if req.adapter is not None and not 1 <= len(req.adapter) <= _MAX_ID_CHARS:
            raise InvalidRequest(f"adapter must be 1..{_MAX_ID_CHARS} characters", field="adapter")
        if req.adapter is not None:
            parse_adapter_ref(req.adapter)  # NAME or NAME@VERSION, else InvalidRequest
        if req.tenant is not None and not 1 <= len(req.tenant) <= _MAX_ID_CHARS:
            raise InvalidRequest(f"tenant must be 1..{_MAX_ID_CHARS} characters", field="tenant")

    async def _reply_error(self, identity: bytes, request_id: str, exc: VajraError) -> None:
        self.counters[f"error_{exc.code.value}"] += 1
        await self.frontend.send([identity, *error_frames(request_id, exc)])

    # --- tenant queries and administration ---------------------------------------------------

    async def _on_query(self, identity: bytes, msg: Query) -> None:
        """Answer one query or admin request; Redis is reached in a worker thread, bounded."""
        try:
            await self._reply_with(
                identity, msg.request_id, self._answer(msg), timeout_s=self.cfg.bus.rpc_timeout_s
            )
        finally:
            self._queries -= 1

    async def _reply_with(
        self,
        identity: bytes,
        request_id: str,
        answer: Coroutine[Any, Any, Message],
        *,
        timeout_s: float = math.inf,
    ) -> None:
        """Send ``answer``'s reply, or the typed error it raised (a timeout: unavailable)."""
        try:
            with trio.fail_after(timeout_s):
                reply = await answer
        except VajraError as exc:
            await self._reply_error(identity, request_id, exc)
            return
        except trio.TooSlowError:
            await self._reply_error(
                identity, request_id, UnavailableError("cluster state is unreachable; retry")
            )
            return
        await self.frontend.send([identity, *encode(reply)])

    async def _tenant_of(self, api_key: str) -> TenantRecord:
        """The key's tenant (through the auth cache); AuthError for an unknown or revoked key."""
        tenant = await self._lookup_key(api_key)
        if tenant is None:
            self.counters["auth_failed"] += 1
            raise AuthError("invalid API key")
        return tenant

    async def _answer(self, msg: Query) -> Message:
        if isinstance(msg, WhoAmIRequest):
            t = await self._tenant_of(msg.api_key)
            return TenantInfo(
                msg.request_id, t.tenant_id, t.name, self.cfg.adapters.max_adapter_bytes
            )
        if isinstance(msg, UsageQuery):
            t = await self._tenant_of(msg.api_key)
            if msg.tenant is not None and msg.tenant not in (t.tenant_id, t.name):
                # Same answer whether or not the named tenant exists: ids must not leak.
                raise NotFoundError(f"no tenant {msg.tenant!r}", field="tenant_id")
            u = await self.state.get_usage(t.tenant_id)
            return UsageReply(
                msg.request_id,
                t.tenant_id,
                t.name,
                u.requests,
                u.gpu_ms,
                u.prompt_tokens,
                u.completion_tokens,
            )
        if isinstance(msg, ClusterStatusRequest):
            beats = await self.state.list_heartbeats()
            return ClusterStatusReply(
                msg.request_id,
                [hb.executor_id for hb in beats],
                [hb.queue_depth for hb in beats],
                [hb.running for hb in beats],
                [len(hb.resident_adapters) for hb in beats],
                [hb.free_memory_bytes for hb in beats],
            )
        return await self._admin(msg)

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
            record, key = await self.state.create_tenant(msg.tenant or "")
            return AdminReply(msg.request_id, msg.action, record.tenant_id, record.name, key)
        if msg.action in ("create_key", "delete_tenant"):
            ref = msg.tenant or ""
            t = await self.state.get_tenant_by_name(ref) or await self.state.get_tenant(ref)
            if t is None:
                raise NotFoundError(f"no tenant {ref!r}", field="tenant")
            if msg.action == "create_key":
                key = await self.state.create_api_key(t.tenant_id)
                return AdminReply(msg.request_id, msg.action, t.tenant_id, t.name, key)
            self._auth_epoch += 1
            await self.state.delete_tenant(t.tenant_id)
            self._auth_epoch += 1
            for k, entry in list(self._auth_cache.items()):
                if entry.tenant is not None and entry.tenant.tenant_id == t.tenant_id:
                    del self._auth_cache[k]
            return AdminReply(msg.request_id, msg.action, t.tenant_id, t.name)
        if msg.action == "revoke_key":
            if not msg.api_key:
                raise InvalidRequest("api_key is required", field="api_key")
            self._auth_epoch += 1
            revoked = await self.state.revoke_api_key(msg.api_key)
            self._auth_epoch += 1
            self._auth_cache.pop(msg.api_key, None)
            if not revoked:
                raise NotFoundError("no such API key", field="api_key")
            return AdminReply(msg.request_id, msg.action)
        raise InvalidRequest(f"unknown admin action {msg.action!r}", field="action")

    # --- adapters: resolution on the request path --------------------------------------------

    async def _resolve_then_dispatch(
        self, identity: bytes, req: InferRequest, tenant: TenantRecord
    ) -> None:
        """Resolve ``req.adapter`` for the tenant in Redis (a cache miss), then dispatch."""
        assert req.adapter is not None
        try:
            resolved = await self.adapters.resolve(tenant.tenant_id, req.adapter)
        except VajraError as exc:
            if not isinstance(exc, InvalidRequest):
                log.warning("adapter lookup failed: %s", exc)
            await self._reply_error(identity, req.request_id, exc)
            return
        if resolved is None:
            await self._reply_error(identity, req.request_id, not_found(req.adapter))
            return
        self._dispatch(identity, req, tenant, resolved)
        await self._work_out.flush()

    # --- adapters: push, list, delete ----------------------------------------------------------

    async def _on_adapter_op(
        self, identity: bytes, msg: AdapterOp, bulk: tuple[bytes, ...], nursery: trio.Nursery
    ) -> None:
        """Start one adapter operation in its own task, or refuse it at once when too many run.

        Uploads are bounded by ``adapters.max_concurrent_pushes`` (each holds its files in
        memory), list and delete by the query limit.
        """
        self.counters[f"adapter_{msg.KIND}"] += 1
        if not self._accepting:
            await self._reply_error(
                identity, msg.request_id, UnavailableError("the gateway is shutting down")
            )
            return
        is_push = isinstance(msg, AdapterPush)
        if (is_push and self._pushes >= self.cfg.adapters.max_concurrent_pushes) or (
            self._adapter_ops >= _MAX_QUERIES
        ):
            self.counters["overloaded"] += 1
            await self._reply_error(
                identity,
                msg.request_id,
                OverloadedError("too many adapter operations in flight; retry later"),
            )
            return
        self._adapter_ops += 1
        self._pushes += is_push
        nursery.start_soon(self._run_adapter_op, identity, msg, bulk, is_push)

    async def _run_adapter_op(
        self, identity: bytes, msg: AdapterOp, bulk: tuple[bytes, ...], is_push: bool
    ) -> None:
        try:
            await self._reply_with(identity, msg.request_id, self._adapter_op(msg, bulk))
        finally:
            self._adapter_ops -= 1
            self._pushes -= is_push

    async def _adapter_op(self, msg: AdapterOp, bulk: tuple[bytes, ...]) -> Message:
        if not msg.request_id or len(msg.request_id) > _MAX_ID_CHARS:
            raise InvalidRequest(
                f"request_id must be 1..{_MAX_ID_CHARS} characters", field="request_id"
            )
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            tenant = await self._tenant_of(msg.api_key)
        if msg.tenant is not None and msg.tenant not in (tenant.tenant_id, tenant.name):
            raise InvalidRequest(f"unknown tenant {msg.tenant!r}", field="tenant")
        return await self.adapters.handle(tenant, msg, bulk)

    # --- executor and scheduler side --------------------------------------------------------

    async def _serve_replies(self, sock: ZSocket, routed: bool) -> None:
        """Forward replies for requests in flight; ``routed``: frames start with an identity."""
        batch_size = self.cfg.bus.recv_batch
        while True:
            for frames in await sock.recv_batch(batch_size):
                body = frames[1:] if routed else frames
                for env, _ in decode_many(body, max_body_bytes=self.cfg.bus.max_body_bytes):
                    if isinstance(env, DecodeError):
                        self.counters["malformed_internal_frames"] += 1
                        log.warning("dropped a malformed reply frame: %s", env)
                        continue
                    self._forward(env.message)
            await self._client_out.flush()

    def _forward(self, msg: Message) -> None:
        request_id = getattr(msg, "request_id", None)
        p = self._pending.get(request_id) if isinstance(request_id, str) else None
        if p is None:
            self.counters["late_replies"] += 1
            return
        out: Message
        if isinstance(msg, TokenChunk):
            if not p.stream:
                return
            out = TokenChunk(p.client_request_id, msg.index, msg.text, msg.token_ids)
        elif isinstance(msg, InferResult):
            del self._pending[msg.request_id]
            self.counters["results"] += 1
            out = InferResult(
                p.client_request_id,
                msg.text,
                msg.token_ids,
                msg.finish_reason,
                msg.prompt_tokens,
                msg.completion_tokens,
                msg.gpu_ms,
                msg.executor_id,
                msg.queue_ms,
            )
        elif isinstance(msg, ErrorReply):
            del self._pending[msg.request_id]
            self.counters[f"error_{msg.code}"] += 1
            out = ErrorReply(p.client_request_id, msg.code, msg.message, msg.field, msg.retriable)
        else:
            self.counters["unexpected_internal_kind"] += 1
            return
        self._client_out.add(encode(out), p.identity)

    async def _expire_deadlines(self) -> None:
        """Answer every request whose deadline passed with a retriable TimeoutError."""
        while True:
            await trio.sleep(0.05)
            now = trio.current_time()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, internal_id = heapq.heappop(self._deadlines)
                p = self._pending.pop(internal_id, None)
                if p is None:
                    continue
                self.counters["deadline_expired"] += 1
                await self._reply_error(
                    p.identity,
                    p.client_request_id,
                    TimeoutError("the request's deadline passed before it was answered"),
                )

    def snapshot(self) -> dict[str, Any]:
        return {"inflight": len(self._pending), **self.counters}
