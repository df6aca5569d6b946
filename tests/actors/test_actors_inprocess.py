"""Actors run in-process on real sockets (ipc in a temp dir) and a real Valkey.

Test rules: no network beyond loopback/ipc; every test under ``trio.fail_after``; peers that
misbehave (a silent executor, a dead ledger) are played by raw sockets.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trio
import zmq

from tests.actors.inbox import Inbox
from tests.inprocess import inprocess_config
from vajra.actors.base import wait_until
from vajra.actors.executor import Executor
from vajra.actors.gateway import Gateway
from vajra.actors.ledger import Ledger
from vajra.actors.scheduler import Scheduler
from vajra.bus.codec import decode, encode
from vajra.bus.messages import (
    ErrorReply,
    ExecutorHello,
    InferResult,
    InferWork,
    LoadReport,
    Sampling,
    UsageAck,
    UsageBatch,
    UsageEvent,
)
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.client import (
    AsyncClient,
    AuthError,
    NotFoundError,
    OverloadedError,
    TimeoutError,
    UnavailableError,
)
from vajra.config import VajraConfig
from vajra.state import ClusterState


@pytest.fixture
def cfg(tmp_path: Path, valkey_url: str) -> VajraConfig:
    base = inprocess_config(tmp_path / "run", valkey_url)
    return base.replace("scheduler", executor_timeout_s=0.4).replace(
        "executor", usage_resend_s=0.2, drain_timeout_s=1.0
    )


@pytest.fixture
def state(valkey_url: str, raw: redis.Redis[str]) -> Iterator[ClusterState]:
    with ClusterState(valkey_url) as s:
        yield s


def _api_key(valkey_url: str) -> tuple[str, str]:
    with ClusterState(valkey_url) as s:
        t, key = s.tenants.create(f"t{uuid.uuid4().hex[:8]}")
    return t.tenant_id, key


def _work(rid: str, tenant: str = "t_1", deadline_ms: int = 60_000) -> InferWork:
    from vajra.actors.base import now_ms

    return InferWork(
        request_id=rid,
        tenant_id=tenant,
        prompt="p",
        adapter=None,
        sampling=Sampling(max_tokens=1),
        stream=False,
        deadline_unix_ms=now_ms() + deadline_ms,
        gateway_id="gw-test",
    )


async def test_scheduler_fails_requests_of_a_silent_executor_and_of_a_restart(
    cfg: VajraConfig,
) -> None:
    cfg = cfg.replace("scheduler", no_capacity_wait_ms=0)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sched = Scheduler(cfg)
            await nursery.start(sched.run)
            gw = open_socket(ctx, zmq.DEALER, identity=b"gw-test")
            gw.connect(cfg.cluster.scheduler_address)
            gw_in = Inbox(gw, routed=False)
            # No executor at all: a retriable UnavailableError.
            await gw.send(encode(_work("r0")))
            reply = await gw_in.next()
            assert isinstance(reply, ErrorReply) and reply.code == "unavailable" and reply.retriable

            ex = open_socket(ctx, zmq.DEALER, identity=b"exec-9")
            ex.connect(cfg.cluster.scheduler_dispatch_address)
            ex_in = Inbox(ex, routed=False)
            await ex.send(encode(ExecutorHello("exec-9", "inc-1", "m", 2, 1)))
            await wait_until(lambda: "exec-9" in sched.executors)
            for i in range(3):
                await gw.send(encode(_work(f"r{i + 1}")))
            got = [(await ex_in.next()) for _ in range(3)]
            assert [w.request_id for w in got if isinstance(w, InferWork)] == ["r1", "r2", "r3"]
            # It reports itself full (batch 2 + queue 1): the next request waits for room
            # (scheduler.no_capacity_wait_ms, 0 here), then is refused as no_capacity.
            await ex.send(encode(LoadReport("exec-9", "inc-1", 1, 2, finished_ids=["r1"])))
            await wait_until(lambda: "r1" not in sched.executors["exec-9"].inflight)
            await gw.send(encode(_work("r4")))
            reply = await gw_in.next()
            assert isinstance(reply, ErrorReply) and reply.code == "no_capacity"
            assert reply.retriable
            # Then the executor restarts with a new incarnation: r2, r3 (not streaming) are
            # dispatched again, once, to the new incarnation.
            await ex.send(encode(ExecutorHello("exec-9", "inc-2", "m", 2, 1)))
            again = {(await ex_in.next()).request_id for _ in range(2)}  # type: ignore[attr-defined]
            assert again == {"r2", "r3"}
            # New work goes to the new incarnation; then the executor falls silent: with no
            # executor left, everything it held fails (r2, r3 had their one re-dispatch).
            await gw.send(encode(_work("r5")))
            assert (await ex_in.next()).request_id == "r5"  # type: ignore[attr-defined]
            replies = [await gw_in.next() for _ in range(3)]
            assert {r.request_id for r in replies} == {"r2", "r3", "r5"}  # type: ignore[attr-defined]
            for reply in replies:
                assert isinstance(reply, ErrorReply)
                assert reply.code == "unavailable" and "stopped responding" in reply.message
            assert sched.executors == {}
            nursery.cancel_scope.cancel()
    ctx.destroy(linger=0)


async def test_gateway_sheds_load_expires_deadlines_and_answers_unknown_adapters(
    cfg: VajraConfig, state: ClusterState, valkey_url: str
) -> None:
    cfg = cfg.replace("gateway", max_inflight=2)
    tenant_id, key = _api_key(valkey_url)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            gateway = Gateway(cfg, state)
            address = await nursery.start(gateway.run)
            # A scheduler that accepts work and never answers.
            sched = open_socket(ctx, zmq.ROUTER)
            sched.bind(cfg.cluster.scheduler_address)
            async with AsyncClient(address, key, timeout_s=5) as c:
                with pytest.raises(AuthError):
                    async with AsyncClient(address, "vk_wrong", timeout_s=5) as bad:
                        await bad.infer("x")
                with pytest.raises(NotFoundError) as nf:
                    await c.infer("x", adapter="someone-elses")
                assert nf.value.field == "adapter"

                async def hang() -> None:  # long enough to be in flight when the third comes
                    with pytest.raises(TimeoutError):
                        await c.infer("x", timeout_s=3)

                nursery.start_soon(hang)
                nursery.start_soon(hang)
                sched_in = Inbox(sched, routed=True)
                await sched_in.next()
                await sched_in.next()
                with pytest.raises(OverloadedError):
                    await c.infer("x", timeout_s=2)
                # Both deadlines pass: the gateway answers and forgets them (the client's own
                # deadline usually fires first and cancels: the same end).
                counters = gateway.counters
                await wait_until(lambda: counters["deadline_expired"] + counters["cancels"] == 2)
                assert not gateway.replies._pending and not gateway.replies._by_client
                assert gateway.limits.inflight(tenant_id) == 0
                # Draining: new work is refused with a retriable error.
                await gateway.drain()
                with pytest.raises(UnavailableError):
                    await c.infer("x", timeout_s=2)
            nursery.cancel_scope.cancel()
    ctx.destroy(linger=0)


async def test_usage_is_resent_until_the_ledger_records_it_once(
    cfg: VajraConfig, state: ClusterState, valkey_url: str
) -> None:
    tenant_id, key = _api_key(valkey_url)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(Scheduler(cfg).run)
            executor = Executor(cfg, state, executor_id="exec-0", model="null")
            await nursery.start(executor.run)
            gateway_address = await nursery.start(Gateway(cfg, state).run)
            async with AsyncClient(gateway_address, key, timeout_s=10) as c:
                for _ in range(20):
                    try:
                        r = await c.infer("hello", max_tokens=1)
                        break
                    except UnavailableError:  # the executor's hello may still be on its way
                        await trio.sleep(0.1)
                for _ in range(4):
                    await c.infer("hello", max_tokens=1)
            assert r.text == "."
            # No ledger yet: the events wait in the outbox and are resent.
            await trio.sleep(0.5)
            assert len(executor.usage.pending) == 5
            assert executor.counters["usage_resent"] >= 5
            ledger = Ledger(cfg, state)
            await nursery.start(ledger.run)
            await wait_until(lambda: not executor.usage.pending)
            usage = state.usage.get(tenant_id)
            assert usage.requests == 5
            assert usage.completion_tokens == 5
            nursery.cancel_scope.cancel()


async def test_a_busy_key_is_refreshed_ahead_and_a_revoked_one_stops_within_its_ttl(
    cfg: VajraConfig, state: ClusterState, valkey_url: str
) -> None:
    """Requests on a busy key never wait for Redis after the first; revocation still lands."""
    ttl = 1.0
    cfg = cfg.replace("gateway", auth_cache_ttl_s=ttl)
    _, key = _api_key(valkey_url)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(Scheduler(cfg).run)
            await nursery.start(Executor(cfg, state, executor_id="exec-0", model="null").run)
            gateway = Gateway(cfg, state)
            address = await nursery.start(gateway.run)
            async with AsyncClient(address, key, timeout_s=10) as c:
                for _ in range(20):
                    try:
                        await c.infer("hello", max_tokens=1)
                        break
                    except UnavailableError:  # the executor's hello may still be on its way
                        await trio.sleep(0.1)
                start, refreshed = trio.current_time(), gateway.counters["auth_refreshes"]
                while trio.current_time() - start < 2.5 * ttl:  # several cache lifetimes
                    await c.infer("hello", max_tokens=1)
                    await trio.sleep(0.01)
                assert gateway.counters["auth_cache_misses"] == 1
                # One background refresh per half-life; none of these requests missed.
                assert 2 <= gateway.counters["auth_refreshes"] - refreshed <= 2.5 / 0.5 + 1
                # Revoked behind the gateway's back (Redis directly): refused within the TTL.
                with ClusterState(valkey_url) as st:
                    assert st.api_keys.revoke(key)
                revoked_at = trio.current_time()
                with pytest.raises(AuthError):
                    while True:
                        await c.infer("hello", max_tokens=1)
                        await trio.sleep(0.01)
                # Within the TTL, plus slack for a slow host.
                assert trio.current_time() - revoked_at < ttl + 1.0
            nursery.cancel_scope.cancel()


async def test_ledger_acknowledges_duplicates_without_counting_them(
    cfg: VajraConfig, state: ClusterState
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ledger = Ledger(cfg, state)
            await nursery.start(ledger.run)
            sender: ZSocket = open_socket(ctx, zmq.DEALER, identity=b"exec-x")
            sender.connect(cfg.cluster.ledger_address)
            ev = UsageEvent("ev-1", "t_abc", "r1", "exec-x", 12.5, 3, 4, 1000)
            bad = UsageEvent("ev bad id!", "t_abc", "r2", "exec-x", 1.0, 1, 1, 1000)
            await sender.send(encode(UsageBatch([ev, ev])))
            await sender.send(encode(UsageBatch([bad, ev])))
            acked: list[str] = []
            while len(acked) < 4:
                msg = decode(await sender.recv()).message
                assert isinstance(msg, UsageAck)
                acked += msg.event_ids
            assert sorted(acked) == sorted(["ev-1", "ev-1", "ev bad id!", "ev-1"])
            usage = state.usage.get("t_abc")
            assert (usage.requests, usage.gpu_ms, usage.prompt_tokens) == (1, 12.5, 3)
            assert ledger.counters["events_invalid"] == 1
            await sender.send([b"garbage"])
            await sender.send(encode(UsageBatch([ev])))
            msg = decode(await sender.recv()).message
            assert isinstance(msg, UsageAck) and msg.event_ids == ["ev-1"]
            assert ledger.counters["malformed_frames"] == 1
            nursery.cancel_scope.cancel()
    ctx.destroy(linger=0)


async def test_executor_drain_finishes_and_refuses_new_work(
    cfg: VajraConfig, state: ClusterState
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            dispatch = open_socket(ctx, zmq.ROUTER, handover=True)
            dispatch.bind(cfg.cluster.scheduler_dispatch_address)
            replies = open_socket(ctx, zmq.ROUTER, handover=True)
            replies.bind(cfg.cluster.gateway_backend_address)
            replies_in = Inbox(replies, routed=True)
            executor = Executor(cfg, state, executor_id="exec-d", model="null")
            await nursery.start(executor.run)
            hello = decode((await dispatch.recv())[1:]).message
            assert isinstance(hello, ExecutorHello) and hello.executor_id == "exec-d"
            await dispatch.send([b"exec-d", *encode(_work("w1"))])
            msg = await replies_in.next()
            assert isinstance(msg, InferResult) and msg.request_id == "w1"
            await executor.drain()
            await dispatch.send([b"exec-d", *encode(_work("w2"))])
            msg = await replies_in.next()
            assert isinstance(msg, ErrorReply) and msg.code == "unavailable" and msg.retriable
            # Expired work is answered with a timeout, never run.
            assert executor.intake is not None
            executor.intake.draining = False
            await dispatch.send([b"exec-d", *encode(_work("w3", deadline_ms=-1))])
            msg = await replies_in.next()
            assert isinstance(msg, ErrorReply) and msg.code == "timeout"
            nursery.cancel_scope.cancel()
    ctx.destroy(linger=0)


async def test_gateway_turns_a_slow_or_failing_answer_into_a_typed_error(
    cfg: VajraConfig, state: ClusterState
) -> None:
    gateway = Gateway(cfg, state)

    async def never() -> InferResult:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def refuses() -> InferResult:
        raise AuthError("invalid API key")

    with trio.fail_after(10):
        await gateway.protocol.reply_with(b"nobody", "r1", never(), timeout_s=0.05)
        await gateway.protocol.reply_with(b"nobody", "r2", refuses())
    assert gateway.counters["error_unavailable"] == 1
    assert gateway.counters["error_auth_failed"] == 1
    gateway.frontend.close()
    gateway.backend.close()
    gateway.scheduler.close()


async def test_operator_views_need_a_key_and_unknown_keys_cannot_flood_lookups(
    cfg: VajraConfig, state: ClusterState, valkey_url: str
) -> None:
    """stats and cluster_status refuse an empty or unknown key (ping needs none); lookups of
    unknown keys are bounded per connection and in all, while a known key keeps working."""
    cfg = cfg.replace("gateway", max_pending_auth=8, max_pending_auth_per_client=4).replace(
        "http", admin_key="the-admin"
    )
    _, key = _api_key(valkey_url)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(Scheduler(cfg).run)  # with no executor: "unavailable"
            gateway = Gateway(cfg, state)
            address = await nursery.start(gateway.run)
            async with (
                AsyncClient(address, "", timeout_s=10) as anonymous,
                AsyncClient(address, key, timeout_s=10) as tenant,
                AsyncClient(address, "the-admin", timeout_s=10) as admin,
            ):
                await anonymous.ping()
                for client in (anonymous, anonymous.with_api_key("vk_unknown")):
                    with pytest.raises(AuthError):
                        await client.stats()
                    with pytest.raises(AuthError):
                        await client.cluster_status()
                assert "stats_requests" in await tenant.stats()
                assert isinstance(await admin.cluster_status(), list)
                # 100 random keys at once on one connection: at most 4 lookups in flight.
                seen = max_pending = 0
                done = trio.Event()

                async def unknown(i: int) -> None:
                    nonlocal seen
                    with pytest.raises((AuthError, OverloadedError)):
                        await anonymous.with_api_key(f"vk_{i:032x}").infer("x", max_tokens=1)
                    seen += 1

                async def watch() -> None:
                    nonlocal max_pending
                    while not done.is_set():
                        max_pending = max(max_pending, gateway.auth.pending)
                        await trio.lowlevel.checkpoint()

                async with trio.open_nursery() as watcher:
                    watcher.start_soon(watch)
                    async with trio.open_nursery() as flood:
                        for i in range(100):
                            flood.start_soon(unknown, i)
                    done.set()
                assert seen == 100 and max_pending <= 4
                assert gateway.counters["auth_shed_client"] > 0
                assert gateway.auth.pending == 0 and not gateway.admission._awaiting_key
                with pytest.raises(UnavailableError):  # known key: admitted (no executor here)
                    await tenant.infer("x", max_tokens=1, timeout_s=5)
            nursery.cancel_scope.cancel()
