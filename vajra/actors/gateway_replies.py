"""The gateway's generations in flight: their internal ids, deadlines and cancels, and the
routing of their replies back to the clients that sent them.

Data flows left to right::

    executors ─ROUTER(backend)─▶ ReplyRouter ─▶ the client, under its own request id
    scheduler ─DEALER──────────▶ (errors: no executor, executor lost)

Every admitted request is tracked under an internal id ``<gateway_id>.<incarnation>-<seq>``
(:meth:`ReplyRouter.track`); a reply for an id no longer tracked (answered, expired or
cancelled) is dropped and counted (``late_replies``). Forgetting a request frees its slot in
the tenant's in-flight limit, whichever way it ended.

Lost executors: a stream whose executor was lost before its first token (the scheduler's
``unavailable`` error with field ``executor``) is placed once more under a new internal id;
the scheduler itself places non-streaming requests again.

Deadlines: a request whose deadline passes is answered with a retriable ``timeout`` and
forgotten. Cancels: a client's ``CancelRequest`` (its request id and the key it sent it with)
is answered ``cancelled``, and its executor is told (``CancelWork``, sent with the next work).
"""

from __future__ import annotations

import heapq
import hmac
import itertools
import logging
from collections import Counter
from dataclasses import dataclass

import msgspec
import trio

from vajra.actors.base import error_frames
from vajra.actors.gateway_protocol import ClientProtocol
from vajra.bus.codec import DecodeError, decode_many, encode
from vajra.bus.messages import (
    CancelRequest,
    CancelWork,
    ErrorReply,
    InferRequest,
    InferResult,
    InferWork,
    Message,
    TokenChunk,
)
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket
from vajra.config import VajraConfig
from vajra.errors import EXECUTOR_LOST_FIELD, Cancelled, TimeoutError
from vajra.policies.limits import TenantLimits

log = logging.getLogger("vajra.gateway")

#: How often passed deadlines are looked for.
_EXPIRY_POLL_S = 0.05


@dataclass(slots=True)
class _Pending:
    identity: bytes
    client_request_id: str
    deadline: float  # trio clock
    stream: bool
    tenant_id: str
    api_key: str  # the key it was sent with: a cancel must carry the same
    # A stream's work until its first token: placed once more if its executor is lost.
    work: InferWork | None = None


class ReplyRouter:
    """See the module docstring. ``work_out`` carries cancels to the scheduler (flushed by
    the caller); replies to clients go through ``clients``."""

    def __init__(
        self,
        cfg: VajraConfig,
        *,
        id_prefix: str,
        clients: ClientProtocol,
        work_out: Outbox,
        limits: TenantLimits,
        counters: Counter[str],
    ) -> None:
        self.cfg = cfg
        self.clients = clients
        self.work_out = work_out
        self.limits = limits
        self.counters = counters
        self._id_prefix = id_prefix
        self._seq = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._by_client: dict[tuple[bytes, str], str] = {}  # (identity, client id) -> internal
        self._deadlines: list[tuple[float, str]] = []
        self._cancels: list[str] = []  # internal ids for the scheduler, sent with the work

    @property
    def inflight(self) -> int:
        return len(self._pending)

    def track(self, identity: bytes, req: InferRequest, tenant_id: str) -> str:
        """Start tracking an admitted request; returns its new internal id."""
        internal_id = f"{self._id_prefix}{next(self._seq)}"
        deadline = trio.current_time() + req.deadline_ms / 1000.0
        self._pending[internal_id] = _Pending(
            identity, req.request_id, deadline, req.stream, tenant_id, req.api_key
        )
        self._by_client[identity, req.request_id] = internal_id
        heapq.heappush(self._deadlines, (deadline, internal_id))
        return internal_id

    def keep_for_retry(self, internal_id: str, work: InferWork) -> None:
        """Keep a stream's work until its first token (see :meth:`_retry_stream`)."""
        p = self._pending.get(internal_id)
        if p is not None and p.stream:
            p.work = work

    def forget(self, internal_id: str) -> _Pending | None:
        """Stop tracking a request (answered, expired or cancelled); frees its tenant's slot."""
        p = self._pending.pop(internal_id, None)
        if p is not None:
            key = (p.identity, p.client_request_id)
            if self._by_client.get(key) == internal_id:
                del self._by_client[key]
            self.limits.release(p.tenant_id)
        return p

    # --- cancels ----------------------------------------------------------------------------

    def cancel(self, identity: bytes, msg: CancelRequest) -> None:
        """Forget the caller's request, answer it ``cancelled``, and tell its executor.

        The answer waits in ``clients.out`` and the executor's notice in this pass's cancels
        (:meth:`queue_cancels`); an unknown request or a different key gets no answer.
        """
        internal_id = self._by_client.get((identity, msg.request_id))
        p = self._pending.get(internal_id) if internal_id is not None else None
        if p is None or internal_id is None:
            self.counters["cancels_unknown"] += 1  # it ended already: nothing to answer
            return
        if not hmac.compare_digest(msg.api_key.encode(), p.api_key.encode()):
            self.counters["cancels_refused"] += 1
            return
        self.forget(internal_id)
        self.counters["cancels"] += 1
        self._cancels.append(internal_id)
        frames = error_frames(p.client_request_id, Cancelled("the request was cancelled"))
        self.clients.out.add(frames, p.identity)

    def queue_cancels(self) -> None:
        """Queue this pass's cancels for the scheduler (the caller flushes ``work_out``)."""
        if self._cancels:
            self.work_out.add(encode(CancelWork(self._cancels)))
            self._cancels = []

    # --- replies from executors and the scheduler -------------------------------------------

    async def serve(self, sock: ZSocket, routed: bool) -> None:
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
            await self.clients.out.flush()
            await self.work_out.flush()  # streams placed again (returns at once if none)

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
            p.work = None  # a token went out: it can no longer be placed again
            out = msgspec.structs.replace(msg, request_id=p.client_request_id)
        elif isinstance(msg, InferResult):
            self.forget(msg.request_id)
            self.counters["results"] += 1
            out = msgspec.structs.replace(msg, request_id=p.client_request_id)
        elif isinstance(msg, ErrorReply):
            if p.work is not None and msg.field == EXECUTOR_LOST_FIELD:
                self._retry_stream(msg.request_id, p, p.work)
                return
            self.forget(msg.request_id)
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
        self.clients.out.add(encode(out), p.identity)

    def _retry_stream(self, internal_id: str, p: _Pending, work: InferWork) -> None:
        """Place a stream whose executor was lost before it sent a token once more, under a
        new internal id: should the lost executor come back, its replies for the old id are
        dropped as late, so the client never gets tokens of two runs. Queued on ``work_out``
        (the caller flushes); a second loss is answered as an error."""
        new_id = f"{self._id_prefix}{next(self._seq)}"
        del self._pending[internal_id]
        p.work = None
        self._pending[new_id] = p
        self._by_client[p.identity, p.client_request_id] = new_id
        heapq.heappush(self._deadlines, (p.deadline, new_id))
        self.work_out.add(
            encode(msgspec.structs.replace(work, request_id=new_id), message_id=new_id)
        )
        self.counters["streams_redispatched"] += 1

    # --- deadlines --------------------------------------------------------------------------

    async def expire_deadlines(self) -> None:
        """Answer every request whose deadline passed with a retriable TimeoutError."""
        while True:
            await trio.sleep(_EXPIRY_POLL_S)
            now = trio.current_time()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, internal_id = heapq.heappop(self._deadlines)
                p = self.forget(internal_id)
                if p is None:
                    continue
                self.counters["deadline_expired"] += 1
                await self.clients.reply_error(
                    p.identity,
                    p.client_request_id,
                    TimeoutError("the request's deadline passed before it was answered"),
                )
