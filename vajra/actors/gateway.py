"""The gateway actor: wires its desks to its three sockets and runs them.

Data flows left to right::

    clients ─ROUTER(frontend)─▶ gateway ─DEALER─▶ scheduler ─▶ executor
    clients ◀─ROUTER(frontend)─ gateway ◀─ROUTER(backend)─ executors (chunks, results, errors)
                                        ◀─DEALER─ scheduler (errors: no executor, executor lost)

Each concern has its own module; this one only builds them and hands each client message to
the one that owns its kind:

- :mod:`~vajra.actors.gateway_protocol`: frames in, typed messages out, every frame answered;
- :mod:`~vajra.actors.gateway_admission`: generation requests, from validation and API-key
  auth (:mod:`~vajra.actors.gateway_auth`) through tenant limits to the scheduler's work;
- :mod:`~vajra.actors.gateway_replies`: generations in flight, their internal ids, deadlines
  and cancels, and the routing of executors' replies back to clients;
- :mod:`~vajra.actors.gateway_operations`: tenant queries and administration
  (:mod:`~vajra.actors.gateway_queries`) and adapter uploads (:mod:`~vajra.actors.gateway_adapters`);
- :mod:`~vajra.actors.gateway_jobs`: training jobs (submit, read, cancel, resume, progress).

Every request gets an internal id ``<gateway_id>.<incarnation>-<seq>``, where the incarnation
is random per gateway process: ids never repeat across gateways or restarts, so a client can
neither collide with nor read another client's replies, nor can a restarted gateway hand a new
request the id of one still running (usage event ids derive from request ids, so billing stays
exactly-once too). At start, and every few seconds, the gateway announces its incarnation
(``GatewayHello``) so executors drop rows an earlier incarnation sent.

Limits: per tenant, a token bucket for every operation and a bound on generations in flight
(:mod:`vajra.policies.limits`), answered ``rate_limited`` / ``concurrency_limited`` with a
``retry_after_ms``; per gateway, ``max_inflight`` generations in all (``overloaded``).

Shutdown: :meth:`Gateway.drain` first refuses new requests and uploads, then waits (bounded)
for the requests in flight to be answered.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vajra import bus
from vajra.actors.base import wait_until
from vajra.actors.gateway_adapters import AdapterDesk, AdapterOp
from vajra.actors.gateway_admission import Admission
from vajra.actors.gateway_auth import AuthCache
from vajra.actors.gateway_jobs import JobDesk, JobOp
from vajra.actors.gateway_operations import Operations
from vajra.actors.gateway_protocol import ClientProtocol
from vajra.actors.gateway_queries import Query, QueryDesk
from vajra.actors.gateway_replies import ReplyRouter
from vajra.actors.scheduler_swaps import SwapClient
from vajra.bus.codec import Envelope, encode
from vajra.bus.messages import CancelRequest, GatewayHello, InferRequest, PingRequest, PongReply
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig
from vajra.policies.limits import TenantLimits
from vajra.state import ClusterState
from vajra.storage import ObjectStore, open_store

_HELLO_INTERVAL_S = 2.0
#: After this long the background read of the base model is logged as slow (it goes on).
_WARM_UP_LIMIT_S = 30.0


class Gateway:
    """See the module docstring. Construct, then ``await nursery.start(gateway.run)``."""

    name = "gateway"

    def __init__(
        self,
        cfg: VajraConfig,
        state: ClusterState,
        *,
        store: ObjectStore | None = None,
    ) -> None:
        """``store`` defaults to one built from ``cfg`` (owned and closed here)."""
        self.cfg = cfg
        self.gcfg = g = cfg.gateway
        self.state = state
        self.counters: Counter[str] = Counter()
        self.incarnation = uuid.uuid4().hex[:12]
        self.accepting = True  # False once draining: new requests and uploads are refused
        self._nursery: trio.Nursery | None = None
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
            identity=g.gateway_id.encode(),
            high_water_mark=cfg.bus.high_water_mark,
        )
        # Admitted requests and cancels for the scheduler, sent together at the end of a pass.
        self.work_out = Outbox(self.scheduler)
        self.protocol = ClientProtocol(cfg, self.frontend, self.counters)
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
        # The adapter registry and object store (adapter push/list/delete, name resolution).
        self._owns_store = store is None
        self.store: ObjectStore = store if store is not None else open_store(cfg)
        swaps = SwapClient(self._ctx, cfg.cluster.scheduler_address, g.gateway_id)
        self.adapters = AdapterDesk(cfg, state.adapters, self.store, swaps=swaps)
        self.replies = ReplyRouter(
            cfg,
            id_prefix=f"{g.gateway_id}.{self.incarnation}-",
            clients=self.protocol,
            work_out=self.work_out,
            limits=self.limits,
            counters=self.counters,
        )
        self.admission = Admission(
            cfg,
            incarnation=self.incarnation,
            clients=self.protocol,
            replies=self.replies,
            auth=self.auth,
            limits=self.limits,
            adapters=self.adapters,
            work_out=self.work_out,
            counters=self.counters,
            accepting=self._accepting,
            spawn=self._spawn,
        )
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
        self.jobs = JobDesk(
            cfg,
            state,
            self.store,
            clients=self.protocol,
            queries=self.queries,
            counters=self.counters,
            accepting=self._accepting,
            spawn=self._spawn,
            work_out=self.work_out,
        )
        self.operations = Operations(
            cfg,
            clients=self.protocol,
            queries=self.queries,
            adapters=self.adapters,
            counters=self.counters,
            accepting=self._accepting,
            spawn=self._spawn,
        )
        self.address = ""
        self.backend_address = ""

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, start reading what upload validation needs, and serve clients until cancelled.

        The base model's modules (so torch and transformers) are read in the background from
        the start, so the first adapter upload after a start does not pay for them; an upload
        that arrives during the read waits for it. Inference and queries are served at once:
        a restarted gateway is not held back by an import it needs only for uploads.
        """
        c = self.cfg.cluster
        try:
            self.address = self.frontend.bind(c.gateway_address)
            self.backend_address = self.backend.bind(c.gateway_backend_address)
            self.scheduler.connect(c.scheduler_address)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.replies.serve, self.backend, True)
                nursery.start_soon(self.replies.serve, self.scheduler, False)
                nursery.start_soon(self.replies.expire_deadlines)
                nursery.start_soon(self._announce)
                nursery.start_soon(self.adapters.warm_up, _WARM_UP_LIMIT_S)
                nursery.start_soon(self.adapters.serve_swaps)
                nursery.start_soon(self.jobs.expire_leases)
                nursery.start_soon(self.protocol.serve, self._on_client_message, self._end_pass)
                task_status.started(self.address)
        finally:
            self._nursery = None
            for s in (self.frontend, self.backend, self.scheduler):
                s.close()
            self._ctx.term()
            if self._owns_store:
                with trio.CancelScope(shield=True), trio.move_on_after(6.0):
                    await trio.to_thread.run_sync(self.store.close)

    async def drain(self) -> None:
        """Refuse new requests, then wait (bounded) until those in flight are answered."""
        self.accepting = False
        with trio.move_on_after(self.cfg.executor.drain_timeout_s + 1.0):
            await wait_until(lambda: self.replies.inflight == 0)

    async def _announce(self) -> None:
        """Tell the executors (through the scheduler) which incarnation of this gateway lives."""
        hello = encode(GatewayHello(self.gcfg.gateway_id, self.incarnation))
        while True:
            self.work_out.add(hello)
            await self.work_out.flush()
            await trio.sleep(_HELLO_INTERVAL_S)

    # --- wiring ---------------------------------------------------------------------------

    async def _on_client_message(self, identity: bytes, env: Envelope) -> None:
        """Hand one client message to the desk that owns its kind."""
        msg = env.message
        if isinstance(msg, AdapterOp):
            await self.operations.on_adapter_op(identity, msg, env.bulk)
        elif isinstance(msg, InferRequest):
            self.counters["requests"] += 1
            await self.admission.on_infer(identity, msg)
        elif isinstance(msg, CancelRequest):
            if not self.jobs.cancel_watch(identity, msg):
                self.replies.cancel(identity, msg)
        elif isinstance(msg, PingRequest):
            await self.protocol.send(identity, PongReply(msg.request_id))
        elif isinstance(msg, Query):
            await self.operations.on_query(identity, msg)
        elif isinstance(msg, JobOp):
            await self.jobs.on_message(identity, msg, env.bulk)
        else:
            await self.protocol.refuse_kind(identity, msg)

    async def _end_pass(self) -> None:
        """After each batch of client messages: the scheduler's work, then clients' answers."""
        self.replies.queue_cancels()
        await self.work_out.flush()
        await self.protocol.out.flush()  # the answers to this pass's cancels

    def _accepting(self) -> bool:
        return self.accepting

    def snapshot(self) -> dict[str, int]:
        return {**self.counters, "inflight": self.replies.inflight}

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a background task in the gateway's nursery (the desks' hook)."""
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)
