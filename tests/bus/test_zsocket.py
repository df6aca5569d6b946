"""The Trio adapter over ZeroMQ.

Test rules: loopback/inproc only, every test under ``fail_after``.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio
import trio.lowlevel
import zmq

from vajra.bus.zsocket import ZSocket, open_socket


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.term()


def _pair(ctx: zmq.Context[zmq.Socket[bytes]], hwm: int = 10_000) -> tuple[ZSocket, ZSocket]:
    router = open_socket(ctx, zmq.ROUTER, high_water_mark=hwm)
    address = router.bind("tcp://127.0.0.1:0")
    dealer = open_socket(ctx, zmq.DEALER, identity=b"d1", high_water_mark=hwm)
    dealer.connect(address)
    return router, dealer


async def test_bind_resolves_a_free_port(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    router, dealer = _pair(ctx)
    assert router.raw.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1] != "0"
    router.close()
    dealer.close()


async def test_two_tasks_send_and_receive_on_one_dealer_without_stalling(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """The edge-triggered trap: a send consuming the edge a receiver waits on."""
    router, dealer = _pair(ctx)
    n = 3_000
    got: list[bytes] = []

    async def echo() -> None:
        for _ in range(n):
            ident, payload = await router.recv()
            await router.send([ident, payload])

    async def sender() -> None:
        for i in range(n):
            await dealer.send([str(i).encode()])
            if i % 7 == 0:
                await trio.lowlevel.checkpoint()

    async def receiver() -> None:
        while len(got) < n:
            got.extend(m[0] for m in await dealer.recv_batch(64))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            nursery.start_soon(receiver)
            nursery.start_soon(sender)
    assert sorted(int(x) for x in got) == list(range(n))
    router.close()
    dealer.close()


async def test_many_receivers_and_senders_share_one_socket(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    router, dealer = _pair(ctx)
    total = 400
    received: list[bytes] = []

    async def echo() -> None:
        for _ in range(total):
            frames = await router.recv()
            await router.send(frames)

    async def recv_some(k: int) -> None:
        for _ in range(k):
            received.append((await dealer.recv())[0])

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            for _ in range(4):
                nursery.start_soon(recv_some, total // 4)
            for s in range(4):
                nursery.start_soon(
                    lambda s=s: _send_range(dealer, range(s, total, 4))  # type: ignore[misc]
                )
    assert sorted(int(x) for x in received) == list(range(total))
    router.close()
    dealer.close()


async def _send_range(sock: ZSocket, numbers: range) -> None:
    for i in numbers:
        await sock.send([str(i).encode()])


async def test_recv_batch_drains_what_is_waiting(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    router, dealer = _pair(ctx)
    with trio.fail_after(10):
        for i in range(50):
            await dealer.send([b"%d" % i])
        got: list[list[bytes]] = []
        while len(got) < 50:
            got.extend(await router.recv_batch(1000))
    assert len(got) == 50
    assert [f[1] for f in got] == [b"%d" % i for i in range(50)]
    router.close()
    dealer.close()


async def test_cancelled_recv_leaves_socket_usable(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    router, dealer = _pair(ctx)
    with trio.fail_after(10):
        with trio.move_on_after(0.05):
            await dealer.recv()
        await dealer.send([b"ping"])
        ident, _payload = await router.recv()
        await router.send([ident, b"pong"])
        assert await dealer.recv() == [b"pong"]
    router.close()
    dealer.close()


async def test_close_wakes_a_waiting_receiver(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    router, dealer = _pair(ctx)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def wait_forever() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await dealer.recv()

            nursery.start_soon(wait_forever)
            await trio.sleep(0.05)
            dealer.close()
    router.close()


async def test_send_nowait_reports_a_full_queue(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    sock = open_socket(ctx, zmq.DEALER, high_water_mark=1)
    # No peer connected: a DEALER with no peers cannot send at all.
    assert sock.send_nowait([b"x"]) is False
    sock.close()


async def _other_task_runs_while(
    loop: object,
) -> int:
    """How many times a competing task got to run while ``loop`` (an async callable) ran."""
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()  # let the ticker start
        ticks = 0
        await loop()  # type: ignore[operator]
        done = True
    return ticks


async def test_recv_batch_yields_even_when_messages_keep_arriving(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """A consumer that never runs dry must still let the actor's other tasks run."""
    router, dealer = _pair(ctx)
    try:
        with trio.fail_after(20):
            for i in range(2_000):
                await dealer.send([b"%d" % i])
            first = await router.recv()  # the connection is up and messages are queued
            assert first[1] == b"0"

            async def drain_in_small_batches() -> None:
                for _ in range(100):
                    batch = await router.recv_batch(5)
                    assert batch  # never runs dry: 1,999 are waiting

            ticks = await _other_task_runs_while(drain_in_small_batches)
        assert ticks >= 50, f"the other task ran {ticks} times during 100 batches"
    finally:
        router.close()
        dealer.close()


async def test_send_each_yields_even_when_the_socket_has_room(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    router, dealer = _pair(ctx)
    try:
        with trio.fail_after(20):

            async def send_many() -> None:
                for i in range(100):
                    await dealer.send_each([[b"%d" % i]])

            ticks = await _other_task_runs_while(send_many)
        assert ticks >= 50, f"the other task ran {ticks} times during 100 sends"
    finally:
        router.close()
        dealer.close()


_CYCLE = """
import gc
import zmq
from vajra.bus.zsocket import new_context, open_socket

class Actor:  # never run, so never closed: it, its context and its socket form a cycle
    pass

def abandon():
    a = Actor()
    a.ctx = new_context()
    a.sock = open_socket(a.ctx, zmq.DEALER)
    a.sock.connect("tcp://127.0.0.1:9")
    a.me = a

abandon()
gc.collect()
print("collected")
"""


def test_collecting_an_abandoned_context_with_open_sockets_does_not_block() -> None:
    """pyzmq's finaliser terminates a context whose weakly held sockets the collector already
    forgot, which blocks forever (it hung the test process at random); ours closes them first."""
    done = subprocess.run(
        [sys.executable, "-c", _CYCLE], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "collected", done.stderr
