"""Batching of internal hops: messages gathered per peer, one ZeroMQ message each.

Test rules: loopback only, every test under ``fail_after``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import zmq

from vajra.bus.codec import Envelope, decode_many, encode
from vajra.bus.messages import ErrorReply
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket, open_socket


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


def _msg(i: int, size: int = 1) -> list[bytes]:
    return encode(ErrorReply(request_id=f"r{i}", code="internal", message="m" * size))


def _ids(frames: list[bytes]) -> list[str]:
    out = []
    for env, _ in decode_many(frames):
        assert isinstance(env, Envelope)
        out.append(env.message.request_id)  # type: ignore[attr-defined]
    return out


def _router_with_dealers(
    ctx: zmq.Context[zmq.Socket[bytes]], names: list[bytes], hwm: int = 10_000
) -> tuple[ZSocket, dict[bytes, ZSocket]]:
    router = open_socket(ctx, zmq.ROUTER, high_water_mark=hwm)
    address = router.bind("tcp://127.0.0.1:0")
    dealers = {}
    for name in names:
        d = open_socket(ctx, zmq.DEALER, identity=name, high_water_mark=hwm)
        d.connect(address)
        dealers[name] = d
    return router, dealers


async def _connected(router: ZSocket, dealers: dict[bytes, ZSocket]) -> None:
    """Each dealer says hello, so the router knows its identity before anything is routed."""
    for d in dealers.values():
        await d.send([b"hi"])
    for _ in dealers:
        await router.recv()


async def test_one_zeromq_message_per_peer_in_the_order_added(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with trio.fail_after(10):
        router, dealers = _router_with_dealers(ctx, [b"a", b"b"])
        await _connected(router, dealers)
        out = Outbox(router)
        for i in range(5):
            out.add(_msg(i), b"a" if i % 2 == 0 else b"b")
        assert out.pending == 5
        await out.flush()
        assert out.pending == 0
        assert _ids(await dealers[b"a"].recv()) == ["r0", "r2", "r4"]
        assert _ids(await dealers[b"b"].recv()) == ["r1", "r3"]
        await out.flush()  # nothing waiting: returns at once, sends nothing
        with trio.move_on_after(0.1):
            await dealers[b"a"].recv()
            pytest.fail("an empty flush sent something")
        for s in (router, *dealers.values()):
            s.close()


async def test_large_batches_are_split_and_a_dealer_sends_without_a_peer(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with trio.fail_after(10):
        router, dealers = _router_with_dealers(ctx, [b"d"])
        out = Outbox(dealers[b"d"], max_messages=4)
        for i in range(10):
            out.add(_msg(i))
        await out.flush()
        got = [_ids((await router.recv())[1:]) for _ in range(3)]
        assert got == [["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"], ["r8", "r9"]]
        with pytest.raises(ValueError, match="max_messages"):
            Outbox(router, max_messages=0)
        for s in (router, *dealers.values()):
            s.close()


async def test_a_second_flush_during_a_blocked_one_keeps_order(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """A flush waiting at the high-water mark also sends what others add meanwhile, in order."""
    with trio.fail_after(20):
        router, dealers = _router_with_dealers(ctx, [b"d"], hwm=1)
        out = Outbox(dealers[b"d"], max_messages=1)  # one ZeroMQ message per message
        n = 200
        first_done = trio.Event()

        async def first_flush() -> None:
            await out.flush()
            first_done.set()

        async with trio.open_nursery() as nursery:
            for i in range(n // 2):
                out.add(_msg(i, 64_000))  # more than the kernel's socket buffers hold
            nursery.start_soon(first_flush)  # blocks: nobody is reading yet
            await trio.sleep(0.05)
            assert not first_done.is_set()
            for i in range(n // 2, n):
                out.add(_msg(i))
            await out.flush()  # returns at once: the first flush sends these too
            assert not first_done.is_set()
            got: list[str] = []
            while len(got) < n:
                got += _ids((await router.recv())[1:])
        assert got == [f"r{i}" for i in range(n)]
        assert out.pending == 0
        for s in (router, *dealers.values()):
            s.close()


async def test_unpacked_outbox_sends_each_message_alone_in_order(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """``pack=False`` (client-facing sockets): one ZeroMQ message per message, sent in one go."""
    with trio.fail_after(10):
        router, dealers = _router_with_dealers(ctx, [b"a", b"b"])
        await _connected(router, dealers)
        out = Outbox(router, pack=False)
        for i in range(6):
            out.add(_msg(i), b"a" if i < 4 else b"b")
        await out.flush()
        assert [_ids(await dealers[b"a"].recv()) for _ in range(4)] == [
            ["r0"],
            ["r1"],
            ["r2"],
            ["r3"],
        ]
        assert [_ids(await dealers[b"b"].recv()) for _ in range(2)] == [["r4"], ["r5"]]
        for s in (router, *dealers.values()):
            s.close()
