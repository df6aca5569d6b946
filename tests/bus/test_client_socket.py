"""The client side of a gateway connection: the Trio DEALER, the blocking one, and both monitors.

Test rules: loopback only; servers bind port 0; every Trio test under ``fail_after``; blocking
waits are bounded by deadlines of a few seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from vajra.bus.client_socket import BlockingContext, connect_dealer
from vajra.bus.zsocket import ROUTER, Context, ZSocket, new_context, open_socket

LIMIT_S = 10
WAIT_S = 5.0


@pytest.fixture
def ctx() -> Iterator[Context[Any]]:
    c: Context[Any] = new_context()
    yield c
    c.term()


def _server(ctx: Context[Any]) -> tuple[ZSocket, str]:
    router = open_socket(ctx, ROUTER)
    return router, router.bind("tcp://127.0.0.1:0")


async def test_the_trio_dealer_talks_and_reports_a_dropped_connection(ctx: Context[Any]) -> None:
    router, address = _server(ctx)
    conn = connect_dealer(address)
    try:
        with trio.fail_after(LIMIT_S):
            await conn.send([b"hello"])
            ident, payload = await router.recv()
            assert payload == b"hello"
            await router.send([ident, b"one"])
            await router.send([ident, b"two"])
            got: list[list[bytes]] = []
            while len(got) < 2:
                got.extend(await conn.recv_batch(8))
            assert got == [[b"one"], [b"two"]]
            assert conn.try_send([b"cheap"])
            assert (await router.recv())[1] == b"cheap"
            router.close()  # the server goes away
            await conn.next_disconnect()
    finally:
        conn.close()
    assert not conn.try_send([b"after close"])  # never raises


async def test_closing_the_trio_dealer_wakes_its_waiters(ctx: Context[Any]) -> None:
    router, address = _server(ctx)
    conn = connect_dealer(address)
    woken: list[str] = []

    async def wait_for(name: str, operation: Any) -> None:
        with pytest.raises(trio.ClosedResourceError):
            await operation()
        woken.append(name)

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for, "recv", lambda: conn.recv_batch(1))
            nursery.start_soon(wait_for, "monitor", conn.next_disconnect)
            await trio.testing.wait_all_tasks_blocked()
            conn.close()
    assert sorted(woken) == ["monitor", "recv"]
    router.close()


def test_a_bad_address_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="nonsense://nowhere"):
        connect_dealer("nonsense://nowhere")
    blocking = BlockingContext()
    try:
        with pytest.raises(ValueError, match="cannot connect"):
            blocking.dealer("tcp://not an address")
    finally:
        blocking.close()


def test_the_blocking_dealer_waits_until_its_deadline(ctx: Context[Any]) -> None:
    router, address = _server(ctx)
    blocking = BlockingContext()
    dealer = blocking.dealer(address)
    try:
        assert dealer.send([b"ping"], time.monotonic() + WAIT_S)
        # Nothing comes back: the wait ends at the deadline, with no message and no drop.
        start = time.monotonic()
        assert dealer.receive(start + 0.2) == (None, False)
        assert 0.15 < time.monotonic() - start < WAIT_S
        assert dealer.recv_nowait() is None
        ident, payload = router.raw.recv_multipart()
        assert payload == b"ping"
        router.raw.send_multipart([ident, b"pong"])
        assert dealer.receive(time.monotonic() + WAIT_S) == ([b"pong"], False)
        router.raw.send_multipart([ident, b"later"])
        assert dealer.receive(time.monotonic() + WAIT_S) == ([b"later"], False)
        assert dealer.try_send([b"cheap"])
        assert router.raw.recv_multipart()[1] == b"cheap"
    finally:
        dealer.close()
        blocking.close()
        router.close()


def test_the_blocking_dealer_reports_a_dropped_connection(ctx: Context[Any]) -> None:
    router, address = _server(ctx)
    blocking = BlockingContext()
    dealer = blocking.dealer(address)
    unwatched = blocking.dealer(address, monitored=False)
    try:
        assert dealer.send([b"hello"])
        assert unwatched.send([b"hello"])
        for _ in range(2):
            router.raw.recv_multipart()  # both connected
        router.close()  # the server goes away
        deadline = time.monotonic() + WAIT_S
        message, dropped = dealer.receive(deadline)
        assert (message, dropped) == (None, True)
        assert time.monotonic() < deadline
        # Without a monitor the drop goes unnoticed: the wait runs to its deadline.
        assert unwatched.receive(time.monotonic() + 0.2) == (None, False)
    finally:
        blocking.close()  # closes both dealers too
    assert not dealer.try_send([b"after close"])  # never raises
