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
import itertools
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import trio
import zmq

from vajra.actors.base import error_frames, new_context, now_ms, stats_frames, wait_until
from vajra.bus.codec import DecodeError, decode, encode
from vajra.bus.messages import (
    ErrorReply,
    InferRequest,
    InferResult,
    InferWork,
    Message,
    StatsRequest,
    TokenChunk,
)
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

log = logging.getLogger("vajra.gateway")

_MAX_ID_CHARS = 128
_MAX_SEED = 2**63 - 1


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

    def __init__(self, cfg: VajraConfig, state: AsyncClusterState) -> None:
        self.cfg = cfg
        self.gcfg = cfg.gateway
        self.state = state
        self.counters: Counter[str] = Counter()
        self._pending: dict[str, _Pending] = {}
        self._deadlines: list[tuple[float, str]] = []
        self._seq = itertools.count(1)
        self._auth_cache: dict[str, tuple[TenantRecord | None, float]] = {}
        self._auth_limiter = trio.CapacityLimiter(64)
        self._accepting = True
        self._ctx = new_context()
        self.frontend: ZSocket = open_socket(
            self._ctx,
            zmq.ROUTER,
            high_water_mark=cfg.bus.high_water_mark,
            max_message_bytes=cfg.bus.max_body_bytes + 65_536,
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
                nursery.start_soon(self._serve_frontend, nursery)
                nursery.start_soon(self._serve_replies, self.backend, True)
                nursery.start_soon(self._serve_replies, self.scheduler, False)
                nursery.start_soon(self._expire_deadlines)
                task_status.started(self.address)
        finally:
            for s in (self.frontend, self.backend, self.scheduler):
                s.close()
            self._ctx.term()

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

    async def _on_client_frames(self, frames: list[bytes], nursery: trio.Nursery) -> None:
        identity = frames[0]
        try:
            env = decode(frames[1:], max_body_bytes=self.cfg.bus.max_body_bytes)
        except DecodeError as exc:
            self.counters["malformed_frames"] += 1
            await self._reply_error(identity, exc.request_id, exc)
            return
        msg = env.message
        if isinstance(msg, InferRequest):
            self.counters["requests"] += 1
            await self._on_infer(identity, msg, nursery)
        elif isinstance(msg, StatsRequest):
            self.counters["stats_requests"] += 1
            self.counters["inflight"] = len(self._pending)
            await self.frontend.send(
                [identity, *stats_frames(msg.request_id, self.name, self.counters)]
            )
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
        if cached is not None and cached[1] > time.monotonic():
            await self._admit(identity, req, cached[0])
        else:
            nursery.start_soon(self._authenticate_then_admit, identity, req)

    async def _authenticate_then_admit(self, identity: bytes, req: InferRequest) -> None:
        try:
            async with self._auth_limiter:
                with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                    tenant = await self.state.authenticate(req.api_key)
        except (VajraError, trio.TooSlowError) as exc:
            log.warning("auth lookup failed: %s", exc)
            await self._reply_error(
                identity, req.request_id, UnavailableError("cluster state is unreachable; retry")
            )
            return
        ttl = self.gcfg.auth_cache_ttl_s if tenant is not None else self.gcfg.auth_cache_ttl_s / 2
        if len(self._auth_cache) > 100_000:
            self._auth_cache.clear()
        self._auth_cache[req.api_key] = (tenant, time.monotonic() + ttl)
        await self._admit(identity, req, tenant)

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
        if req.adapter is not None:
            # The adapter registry is not deployed yet: every adapter name is unknown.
            await self._reply_error(
                identity,
                req.request_id,
                NotFoundError(f"adapter {req.adapter!r} not found", field="adapter"),
            )
            return
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
        )
        await self.scheduler.send(encode(work, message_id=internal_id))

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
        if req.tenant is not None and not 1 <= len(req.tenant) <= _MAX_ID_CHARS:
            raise InvalidRequest(f"tenant must be 1..{_MAX_ID_CHARS} characters", field="tenant")

    async def _reply_error(self, identity: bytes, request_id: str, exc: VajraError) -> None:
        self.counters[f"error_{exc.code.value}"] += 1
        await self.frontend.send([identity, *error_frames(request_id, exc)])

    # --- executor and scheduler side --------------------------------------------------------

    async def _serve_replies(self, sock: ZSocket, routed: bool) -> None:
        """Forward replies for requests in flight; ``routed``: frames start with an identity."""
        batch_size = self.cfg.bus.recv_batch
        while True:
            for frames in await sock.recv_batch(batch_size):
                body = frames[1:] if routed else frames
                try:
                    env = decode(body, max_body_bytes=self.cfg.bus.max_body_bytes)
                except DecodeError as exc:
                    self.counters["malformed_internal_frames"] += 1
                    log.warning("dropped a malformed reply frame: %s", exc)
                    continue
                await self._forward(env.message)

    async def _forward(self, msg: Message) -> None:
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
        await self.frontend.send([p.identity, *encode(out)])

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
