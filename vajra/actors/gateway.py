"""The gateway: client connections, API-key auth, validation, load shedding, reply routing.

Data flows left to right::

    clients ─ROUTER(frontend)─▶ gateway ─DEALER─▶ scheduler ─▶ executor
    clients ◀─ROUTER(frontend)─ gateway ◀─ROUTER(backend)─ executors (chunks, results, errors)
                                        ◀─DEALER─ scheduler (errors: no executor, executor lost)

Every request gets an internal id ``<gateway_id>.<incarnation>-<seq>``, where the incarnation
is random per gateway process: ids never repeat across gateways or restarts, so a client can
neither collide with nor read another client's replies, nor can a restarted gateway hand a new
request the id of one still running (usage event ids derive from request ids, so billing stays
exactly-once too). Replies are re-addressed to the client's own request id. At start, and
every few seconds, the gateway announces its incarnation (``GatewayHello``) so executors drop
rows an earlier incarnation sent. Redis is consulted only on an auth-cache miss, in a worker
thread, off the hot path (see :mod:`vajra.actors.gateway_auth`; lookups in flight are bounded).

Limits: per tenant, a token bucket for every operation and a bound on generations in flight
(:mod:`vajra.policies.limits`), answered ``rate_limited`` / ``concurrency_limited`` with a
``retry_after_ms``; per gateway, ``max_inflight`` generations in all (``overloaded``).

Cancellation: a client's ``CancelRequest`` (its request id and the key it sent it with) makes
the gateway forget the request, answer it ``cancelled`` and tell its executor (``CancelWork``),
which drops the row and bills what it computed.

Errors: every frame from a client is answered — a reply, or an ``ErrorReply`` with a typed
code — and malformed ones are counted; nothing a client sends can stop the gateway (an
unexpected exception while answering becomes an ``internal`` error reply and a log line).
Shutdown: :meth:`drain` first refuses new requests, then waits (bounded) for the requests in
flight to be answered.
"""

from __future__ import annotations

import heapq
import hmac
import itertools
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import trio

from vajra import bus
from vajra.actors.base import error_frames, now_ms, wait_until
from vajra.actors.gateway_adapters import AdapterDesk, AdapterOp
from vajra.actors.gateway_auth import MAX_KEY_CHARS, AuthCache
from vajra.actors.gateway_queries import Query, QueryDesk
from vajra.adapters.registry import (
    AsyncAdapterRegistry,
    ResolvedAdapter,
    not_found,
    parse_adapter_ref,
)
from vajra.bus.codec import DecodeError, decode, decode_many, encode
from vajra.bus.messages import (
    AdapterPush,
    CancelRequest,
    CancelWork,
    ErrorReply,
    GatewayHello,
    InferRequest,
    InferResult,
    InferWork,
    Message,
    PingRequest,
    PongReply,
    TokenChunk,
)
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig
from vajra.errors import (
    AuthError,
    Cancelled,
    InternalError,
    InvalidRequest,
    OverloadedError,
    TimeoutError,
    UnavailableError,
    VajraError,
)
from vajra.policies.limits import TenantLimits
from vajra.state import AsyncClusterState, TenantRecord
from vajra.storage import ObjectStore, open_store

log = logging.getLogger("vajra.gateway")

_MAX_ID_CHARS = 128
_MAX_SEED = 2**63 - 1
_MAX_QUERIES = 256  # tenant queries and admin requests in flight at once
_HELLO_INTERVAL_S = 2.0


@dataclass(slots=True)
class _Pending:
    identity: bytes
    client_request_id: str
    deadline: float  # trio clock
    stream: bool
    tenant_id: str
    api_key: str  # the key it was sent with: a cancel must carry the same


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
        self._by_client: dict[tuple[bytes, str], str] = {}  # (identity, client id) -> internal
        self._deadlines: list[tuple[float, str]] = []
        self.incarnation = uuid.uuid4().hex[:12]
        self._id_prefix = f"{self.gcfg.gateway_id}.{self.incarnation}-"
        self._seq = itertools.count(1)
        g = self.gcfg
        self.auth = AuthCache(
            state,
            ttl_s=g.auth_cache_ttl_s,
            negative_ttl_s=g.auth_negative_ttl_s,
            max_entries=g.auth_cache_entries,
            max_pending=g.max_pending_auth,
            max_pending_per_client=g.max_pending_auth_per_client,
            counters=self.counters,
        )
        self.limits = TenantLimits(
            rate_per_s=g.tenant_rate_limit_per_s,
            burst=g.tenant_rate_limit_burst,
            max_inflight=g.tenant_max_inflight,
        )
        self._cancels: list[str] = []  # internal ids for the scheduler, sent with the work
        # Requests waiting for their key's lookup (one lookup per key), and how many in all.
        self._awaiting_key: dict[str, list[tuple[bytes, InferRequest]]] = {}
        self._awaiting = 0
        self._queries = 0
        # The adapter registry and object store (adapter push/list/delete, name resolution).
        self._owns_registry = registry is None and bool(cfg.cluster.redis_url)
        self.registry = registry
        if self._owns_registry:
            self.registry = AsyncAdapterRegistry.from_url(cfg.cluster.redis_url)
        self._owns_store = store is None
        self.store: ObjectStore = store if store is not None else open_store(cfg)
        self.adapters = AdapterDesk(cfg, self.registry, self.store)
        self.queries = QueryDesk(
            cfg,
            state,
            auth=self.auth,
            limits=self.limits,
            adapters=self.adapters,
            store=self.store,
            counters=self.counters,
            stats=self.snapshot,
            spawn=self._spawn,
        )
        self._pushes = 0
        self._adapter_ops = 0
        self._nursery: trio.Nursery | None = None
        self._accepting = True
        self._ctx = bus.new_context()
        # Each frame (ZeroMQ checks frames one by one) may be an adapter file; larger peers
        # are disconnected by ZeroMQ before they are buffered in full.
        self.frontend: ZSocket = open_socket(
            self._ctx,
            bus.ROUTER,
            high_water_mark=cfg.bus.high_water_mark,
            max_message_bytes=max(cfg.bus.max_body_bytes, cfg.adapters.max_adapter_bytes) + 65_536,
        )
        self.backend: ZSocket = open_socket(
            self._ctx, bus.ROUTER, high_water_mark=cfg.bus.high_water_mark, handover=True
        )
        self.scheduler: ZSocket = open_socket(
            self._ctx,
            bus.DEALER,
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
                nursery.start_soon(self._announce)
                nursery.start_soon(self.adapters.warm_up)
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

    async def _announce(self) -> None:
        """Tell the executors (through the scheduler) which incarnation of this gateway lives."""
        hello = encode(GatewayHello(self.gcfg.gateway_id, self.incarnation))
        while True:
            self._work_out.add(hello)
            await self._work_out.flush()
            await trio.sleep(_HELLO_INTERVAL_S)

    # --- client side ----------------------------------------------------------------------

    async def _serve_frontend(self, nursery: trio.Nursery) -> None:
        batch_size = self.cfg.bus.recv_batch
        while True:
            for frames in await self.frontend.recv_batch(batch_size):
                try:
                    await self._on_client_frames(frames, nursery)
                except VajraError as exc:
                    await self._reply_error(frames[0], "", exc)
                except Exception:  # a bug must cost one answer, never the gateway
                    log.exception("failed to handle a client message")
                    self.counters["internal_errors"] += 1
                    await self._reply_error(frames[0], "", InternalError("internal error"))
            self._flush_cancels()
            await self._work_out.flush()
            await self._client_out.flush()  # the answers to this pass's cancels

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
        elif isinstance(msg, CancelRequest):
            self._on_cancel(identity, msg)
        elif isinstance(msg, PingRequest):
            await self.frontend.send([identity, *encode(PongReply(msg.request_id))])
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
        entry = self.auth.get(req.api_key)
        if entry is not None:
            if self.auth.take_refresh(req.api_key, entry):
                # Ahead of expiry, so a busy key never misses the cache.
                nursery.start_soon(self._refresh_key, req.api_key)
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
            nursery.start_soon(self._authenticate_then_admit, identity, req.api_key)

    async def _shed_lookup(self, identity: bytes, req: InferRequest) -> None:
        self.counters["overloaded"] += 1
        await self._reply_error(
            identity,
            req.request_id,
            OverloadedError("too many API key lookups in flight; retry later"),
        )

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
                await self._reply_error(
                    ident, req.request_id, UnavailableError("cluster state is unreachable; retry")
                )
            else:
                await self._admit(ident, req, tenant)
        await self._work_out.flush()

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
        refused = self.limits.admit(tenant.tenant_id, time.monotonic(), generation=True)
        if refused is not None:
            self.counters[f"tenant_{refused.code.value}"] += 1
            await self._reply_error(identity, req.request_id, refused)
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
                assert self._nursery is not None
                self._nursery.start_soon(self._resolve_then_dispatch, identity, req, tenant)
                return True
            resolved = hit[0]
            if resolved is None:
                await self._reply_error(identity, req.request_id, not_found(req.adapter))
                return False
        self._dispatch(identity, req, tenant, resolved)
        return True

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
        internal_id = f"{self._id_prefix}{next(self._seq)}"
        deadline = trio.current_time() + req.deadline_ms / 1000.0
        self._pending[internal_id] = _Pending(
            identity, req.request_id, deadline, req.stream, tenant.tenant_id, req.api_key
        )
        self._by_client[identity, req.request_id] = internal_id
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
            gateway_incarnation=self.incarnation,
        )
        self._work_out.add(encode(work, message_id=internal_id))

    def _forget(self, internal_id: str) -> _Pending | None:
        """Stop tracking a request (answered, expired or cancelled); frees its tenant's slot."""
        p = self._pending.pop(internal_id, None)
        if p is not None:
            key = (p.identity, p.client_request_id)
            if self._by_client.get(key) == internal_id:
                del self._by_client[key]
            self.limits.release(p.tenant_id)
        return p

    def _on_cancel(self, identity: bytes, msg: CancelRequest) -> None:
        """Forget the caller's request, answer it ``cancelled``, and tell its executor."""
        internal_id = self._by_client.get((identity, msg.request_id))
        p = self._pending.get(internal_id) if internal_id is not None else None
        if p is None or internal_id is None:
            self.counters["cancels_unknown"] += 1  # it ended already: nothing to answer
            return
        if not hmac.compare_digest(msg.api_key.encode(), p.api_key.encode()):
            self.counters["cancels_refused"] += 1
            return
        self._forget(internal_id)
        self.counters["cancels"] += 1
        self._cancels.append(internal_id)
        frames = error_frames(p.client_request_id, Cancelled("the request was cancelled"))
        self._client_out.add(frames, p.identity)

    def _flush_cancels(self) -> None:
        """Queue this pass's cancels for the scheduler (the caller flushes ``_work_out``)."""
        if self._cancels:
            self._work_out.add(encode(CancelWork(self._cancels)))
            self._cancels = []

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
                identity,
                msg.request_id,
                self.queries.answer(msg),
                timeout_s=self.cfg.bus.rpc_timeout_s,
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
        except Exception:  # a bug must cost one answer, never the gateway
            log.exception("failed to answer request %s", request_id[:64])
            self.counters["internal_errors"] += 1
            await self._reply_error(identity, request_id, InternalError("internal error"))
            return
        await self.frontend.send([identity, *encode(reply)])

    # --- adapters: resolution on the request path --------------------------------------------

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
                await self._reply_error(identity, req.request_id, exc)
                return
            if resolved is None:
                await self._reply_error(identity, req.request_id, not_found(req.adapter))
                return
            self._dispatch(identity, req, tenant, resolved)
            dispatched = True
        finally:
            if not dispatched:
                self.limits.release(tenant.tenant_id)
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
            tenant = await self.queries.tenant_of(msg.api_key)
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
            self._forget(msg.request_id)
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
            self._forget(msg.request_id)
            self.counters[f"error_{msg.code}"] += 1
            out = ErrorReply(
                p.client_request_id,
                msg.code,
                msg.message,
                msg.field,
                msg.retriable,
                msg.retry_after_ms,
            )
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
                p = self._forget(internal_id)
                if p is None:
                    continue
                self.counters["deadline_expired"] += 1
                await self._reply_error(
                    p.identity,
                    p.client_request_id,
                    TimeoutError("the request's deadline passed before it was answered"),
                )

    def snapshot(self) -> dict[str, int]:
        return {**self.counters, "inflight": len(self._pending)}

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a background task in the gateway's nursery (the desks' hook)."""
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)
