"""A stream whose executor is lost before its first token is placed once more by its gateway.

The gateway's reply router on real ZeroMQ sockets (inproc): a client, the scheduler's end of
the gateway's work socket, and an executor's reply socket are played by raw sockets, so what
each side receives is exact. The scheduler answers a request whose executor was lost with
``unavailable`` and field ``executor`` (``EXECUTOR_LOST_FIELD``).

Test rules: inproc sockets only; every test under ``trio.fail_after``; no timing assertions.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
import zmq

from tests.actors.inbox import Inbox
from tests.inprocess import inprocess_config
from vajra.actors.base import error_frames
from vajra.actors.gateway_protocol import ClientProtocol
from vajra.actors.gateway_replies import ReplyRouter
from vajra.bus.codec import decode, encode
from vajra.bus.messages import ErrorReply, InferRequest, InferWork, Sampling, TokenChunk
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.errors import EXECUTOR_LOST_FIELD, UnavailableError
from vajra.policies.limits import TenantLimits

LOST = UnavailableError(
    "request lost because its executor stopped responding; retry", field=EXECUTOR_LOST_FIELD
)


@dataclass
class Rig:
    router: ReplyRouter
    client: ZSocket
    scheduler: Inbox
    executor: ZSocket
    limits: TenantLimits
    counters: Counter[str]

    def admit(self, client_id: str, *, stream: bool) -> tuple[str, InferWork]:
        """Track a request as the gateway's admission does; its internal id and work."""
        req = InferRequest(client_id, "key-1", "hello", stream=stream, deadline_ms=60_000)
        assert self.limits.admit("t1", trio.current_time(), generation=True) is None
        internal = self.router.track(b"cli", req, "t1")
        work = InferWork(internal, "t1", "hello", None, Sampling(max_tokens=4), stream, 2**40, "gw")
        if stream:
            self.router.keep_for_retry(internal, work)
        return internal, work

    async def client_gets(self) -> ErrorReply | TokenChunk:
        msg = decode(await self.client.recv()).message
        assert isinstance(msg, (ErrorReply, TokenChunk)), msg
        return msg


@asynccontextmanager
async def rig() -> AsyncIterator[Rig]:
    cfg = inprocess_config(Path("/nonexistent"), "redis://127.0.0.1:1")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    tag = uuid.uuid4().hex
    clients = open_socket(ctx, zmq.ROUTER)
    clients.bind(f"inproc://c-{tag}")
    client = open_socket(ctx, zmq.DEALER, identity=b"cli")
    client.connect(f"inproc://c-{tag}")
    sched = open_socket(ctx, zmq.ROUTER)
    sched.bind(f"inproc://s-{tag}")
    work = open_socket(ctx, zmq.DEALER, identity=b"gw")
    work.connect(f"inproc://s-{tag}")
    backend = open_socket(ctx, zmq.ROUTER)
    backend.bind(f"inproc://b-{tag}")
    executor = open_socket(ctx, zmq.DEALER, identity=b"ex")
    executor.connect(f"inproc://b-{tag}")
    counters: Counter[str] = Counter()
    limits = TenantLimits(rate_per_s=1000.0, burst=1000, max_inflight=10)
    router = ReplyRouter(
        cfg,
        id_prefix="gw.i1-",
        clients=ClientProtocol(cfg, clients, counters),
        work_out=Outbox(work),
        limits=limits,
        counters=counters,
    )
    await client.send([b"hi"])  # the ROUTER learns the client's identity
    await clients.recv()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(router.serve, backend, True)
            yield Rig(router, client, Inbox(sched, routed=True), executor, limits, counters)
            nursery.cancel_scope.cancel()
    finally:
        ctx.destroy(linger=0)


async def test_a_stream_lost_before_its_first_token_runs_once_more_under_a_new_id() -> None:
    with trio.fail_after(20):
        async with rig() as r:
            first_id, work = r.admit("c1", stream=True)
            await r.executor.send(error_frames(first_id, LOST))
            again = await r.scheduler.next()
            assert isinstance(again, InferWork) and again.request_id != first_id
            assert again.prompt == work.prompt and again.stream
            assert r.counters["streams_redispatched"] == 1
            assert r.limits.inflight("t1") == 1  # still one request in flight
            # Should the lost executor come back, its tokens for the old id go nowhere.
            await r.executor.send(encode(TokenChunk(first_id, 0, "stale")))
            await r.executor.send(encode(TokenChunk(again.request_id, 0, "fresh")))
            got = await r.client_gets()
            assert isinstance(got, TokenChunk) and got.text == "fresh" and got.request_id == "c1"
            assert r.counters["late_replies"] == 1
            # A token went out: a loss now is the client's error, not a second run.
            await r.executor.send(error_frames(again.request_id, LOST))
            err = await r.client_gets()
            assert isinstance(err, ErrorReply) and err.request_id == "c1"
            assert err.code == "unavailable" and err.retriable
            assert r.counters["streams_redispatched"] == 1
            assert r.limits.inflight("t1") == 0


async def test_a_second_loss_and_other_errors_reach_the_client() -> None:
    with trio.fail_after(20):
        async with rig() as r:
            first_id, _ = r.admit("c1", stream=True)
            await r.executor.send(error_frames(first_id, LOST))
            again = await r.scheduler.next()
            assert isinstance(again, InferWork)
            await r.executor.send(error_frames(again.request_id, LOST))  # lost twice
            err = await r.client_gets()
            assert isinstance(err, ErrorReply) and err.code == "unavailable"
            # Another unavailable error (not a lost executor) is not retried either.
            other_id, _ = r.admit("c2", stream=True)
            await r.executor.send(error_frames(other_id, UnavailableError("shutting down")))
            err = await r.client_gets()
            assert isinstance(err, ErrorReply) and err.request_id == "c2"
            # Nor is a non-streaming request (the scheduler re-dispatches those itself).
            plain_id, _ = r.admit("c3", stream=False)
            await r.executor.send(error_frames(plain_id, LOST))
            err = await r.client_gets()
            assert isinstance(err, ErrorReply) and err.request_id == "c3"
            assert r.counters["streams_redispatched"] == 1
            assert r.limits.inflight("t1") == 0
