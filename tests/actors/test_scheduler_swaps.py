"""The warm hot swap's protocol at the scheduler, with executors and requesters played by raw
sockets: who is asked to warm, bounded waits, executors lost mid-warm, late and duplicate
replies, malformed swaps and frames, and swaps sent by an executor.

Test rules: ipc sockets in a temp dir only; every test under ``trio.fail_after``; no sleeps
that a result depends on beyond the bounded waits under test.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import zmq

from tests.actors.inbox import Inbox
from tests.inprocess import inprocess_config
from vajra.actors.base import wait_until
from vajra.actors.scheduler import Scheduler
from vajra.actors.scheduler_swaps import SwapWaiters
from vajra.bus.codec import encode
from vajra.bus.messages import (
    AdapterSwap,
    AdapterSwapDone,
    AdapterWarm,
    AdapterWarmed,
    ErrorReply,
    ExecutorHello,
    LoadReport,
)
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig

OLD = hashlib.sha256(b"old").hexdigest()
NEW = hashlib.sha256(b"new").hexdigest()


@pytest.fixture
def cfg(tmp_path: Path) -> VajraConfig:
    return inprocess_config(tmp_path / "run", "redis://unused").replace(
        "scheduler", executor_timeout_s=0.5
    )


def _swap(swap_id: str, wait_ms: int = 5_000, **kw: object) -> AdapterSwap:
    fields: dict[str, object] = {
        "swap_id": swap_id,
        "tenant_id": "t_1",
        "name": "chat",
        "from_digest": OLD,
        "to_version": 2,
        "to_digest": NEW,
        "to_object_key": f"adapters/t_1/{NEW}",
        "wait_ms": wait_ms,
    }
    fields.update(kw)
    return AdapterSwap(**fields)  # type: ignore[arg-type]


class _FakeExecutor:
    """An executor on the dispatch socket that says hello and keeps reporting while alive."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], cfg: VajraConfig, eid: str) -> None:
        self.eid = eid
        self.sock: ZSocket = open_socket(ctx, zmq.DEALER, identity=eid.encode())
        self.sock.connect(cfg.cluster.scheduler_dispatch_address)
        self.inbox = Inbox(self.sock, routed=False)
        self.alive = trio.CancelScope()

    async def keep_alive(self) -> None:
        await self.sock.send(encode(ExecutorHello(self.eid, "inc", "m", 4, 4)))
        with self.alive:
            while True:
                await self.sock.send(encode(LoadReport(self.eid, "inc", 0, 0)))
                await trio.sleep(0.05)

    async def next_warm(self) -> AdapterWarm:
        msg = await self.inbox.next()
        assert isinstance(msg, AdapterWarm), msg
        return msg

    async def answer(self, warm: AdapterWarm, held: bool, loaded: bool, error: str = "") -> None:
        reply = AdapterWarmed(warm.swap_id, self.eid, held, loaded, "gpu" if held else "", error)
        await self.sock.send(encode(reply))


@asynccontextmanager
async def _cluster(
    cfg: VajraConfig, eids: list[str]
) -> AsyncIterator[tuple[Scheduler, ZSocket, Inbox, list[_FakeExecutor]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with trio.open_nursery() as nursery:
            sched = Scheduler(cfg)
            await nursery.start(sched.run)
            gw = open_socket(ctx, zmq.DEALER, identity=b"gw-swaps")
            gw.connect(cfg.cluster.scheduler_address)
            executors = [_FakeExecutor(ctx, cfg, e) for e in eids]
            for ex in executors:
                nursery.start_soon(ex.keep_alive)
            with trio.fail_after(5):
                await wait_until(lambda: len(sched.executors) >= len(eids))
            yield sched, gw, Inbox(gw, routed=False), executors
            nursery.cancel_scope.cancel()
    finally:
        ctx.destroy(linger=0)


async def test_holders_warm_others_skip_a_silent_one_times_out(cfg: VajraConfig) -> None:
    with trio.fail_after(20):
        async with _cluster(cfg, ["ex-a", "ex-b", "ex-c"]) as (sched, gw, gw_in, (a, b, c)):
            t0 = trio.current_time()
            await gw.send(encode(_swap("s1", wait_ms=600)))
            warms = [await ex.next_warm() for ex in (a, b, c)]
            assert {(w.from_digest, w.to_digest) for w in warms} == {(OLD, NEW)}
            await a.answer(warms[0], held=True, loaded=True)
            await b.answer(warms[1], held=False, loaded=False)
            done = await gw_in.next()  # c never answers: the bounded wait ends the swap
            assert isinstance(done, AdapterSwapDone) and done.swap_id == "s1"
            assert 0.5 <= trio.current_time() - t0 < 4.0
            assert (done.ok, done.warmed, done.not_warmed) == (False, ["ex-a"], ["ex-c"])
            assert "no answer" in done.error
            # Late and duplicate replies are dropped, and a second swap works as before.
            await c.answer(warms[2], held=True, loaded=True)
            await a.answer(warms[0], held=True, loaded=True)
            await gw.send(encode(_swap("s2")))
            warms = [await ex.next_warm() for ex in (a, b, c)]
            for ex, w in zip((a, b, c), warms, strict=True):
                await ex.answer(w, held=ex is not b, loaded=ex is not b)
                await ex.answer(w, held=True, loaded=False)  # a duplicate: ignored
            done = await gw_in.next()
            assert isinstance(done, AdapterSwapDone) and done.swap_id == "s2"
            assert (done.ok, done.warmed, done.not_warmed) == (True, ["ex-a", "ex-c"], [])
            await trio.sleep(0.1)
            assert sched.counters["swap_replies_dropped"] >= 3
            assert sched.swaps.swaps == {}


async def test_a_failed_load_and_an_executor_lost_mid_warm_are_not_warmed(
    cfg: VajraConfig,
) -> None:
    with trio.fail_after(20):
        async with _cluster(cfg, ["ex-a", "ex-b"]) as (sched, gw, gw_in, (a, b)):
            t0 = trio.current_time()
            await gw.send(encode(_swap("s1", wait_ms=60_000)))
            wa, _ = await a.next_warm(), await b.next_warm()
            await a.answer(wa, held=True, loaded=False, error="no room")
            b.alive.cancel()  # b dies while warming: lost after executor_timeout_s
            done = await gw_in.next()
            assert isinstance(done, AdapterSwapDone)
            assert trio.current_time() - t0 < 10.0  # long before wait_ms
            assert (done.ok, done.warmed, sorted(done.not_warmed)) == (False, [], ["ex-a", "ex-b"])
            assert "no room" in done.error and "lost" in done.error
            assert sched.swaps.swaps == {}


async def test_malformed_swaps_and_frames_are_answered_and_swaps_with_no_executor_end_at_once(
    cfg: VajraConfig,
) -> None:
    with trio.fail_after(20):
        async with _cluster(cfg, []) as (sched, gw, gw_in, _):
            await gw.send([b"\x01garbage", b"\xc1"])
            reply = await gw_in.next()
            assert isinstance(reply, ErrorReply)
            for bad in (
                _swap("b1", to_digest="not-hex"),
                _swap("b2", from_digest="F" * 64),
                _swap("", wait_ms=10),
                _swap("x" * 129),
            ):
                await gw.send(encode(bad))
                done = await gw_in.next()
                assert isinstance(done, AdapterSwapDone) and not done.ok and done.error, bad
            # A negative or huge wait is clamped; with no executor the swap ends at once.
            await gw.send(encode(_swap("ok", wait_ms=-5)))
            done = await gw_in.next()
            assert isinstance(done, AdapterSwapDone) and done.swap_id == "ok" and done.ok
            assert sched.counters["swaps_refused"] == 4


async def test_an_executor_can_request_a_swap_on_its_dispatch_socket(cfg: VajraConfig) -> None:
    with trio.fail_after(20):
        async with _cluster(cfg, ["ex-a", "ex-trainer"]) as (_, _gw, _gw_in, (a, trainer)):
            waiters = SwapWaiters()
            result: list[AdapterSwapDone] = []

            async def request() -> None:
                result.append(await waiters.request(trainer.sock.send, _swap("t1"), 10.0))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(request)
                wa = await a.next_warm()
                await a.answer(wa, held=True, loaded=True)
                # The trainer is asked too (it is an executor); its own answer, then the done.
                got = await trainer.inbox.next()
                assert isinstance(got, AdapterWarm)
                await trainer.answer(got, held=False, loaded=False)
                done = await trainer.inbox.next()
                assert isinstance(done, AdapterSwapDone)
                assert waiters.deliver(done)
                assert not waiters.deliver(done)  # a duplicate: nobody waits for it any more
            assert result[0].ok and result[0].warmed == ["ex-a"]


async def test_a_requester_that_gets_no_answer_stops_waiting_in_time() -> None:
    waiters = SwapWaiters()
    sent: list[list[bytes]] = []

    async def send(frames: object) -> None:
        sent.append(list(frames))  # type: ignore[call-overload]

    with trio.fail_after(5):
        done = await waiters.request(send, _swap("lost"), 0.2)
    assert len(sent) == 1 and not done.ok and "did not answer" in done.error
    assert not waiters.deliver(AdapterSwapDone("lost", ok=True))  # late: dropped
