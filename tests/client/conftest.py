"""Fixtures for the client tests: the fake gateway, in this Trio run or in its own thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import trio
import zmq
from fake_gateway import FakeGateway


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    """A fake gateway served by a task of the test's own Trio run."""
    ctx: zmq.Context[Any] = zmq.Context()
    gw = FakeGateway(ctx)
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        yield gw
        nursery.cancel_scope.cancel()
    ctx.term()


@contextmanager
def gateway_in_thread() -> Iterator[tuple[FakeGateway, Callable[[], None]]]:
    """A fake gateway served by its own ``trio.run`` in a background thread, and a function
    that stops it (closing its socket, as a killed gateway's would be)."""
    ctx: zmq.Context[Any] = zmq.Context()
    gw = FakeGateway(ctx)
    started: queue.Queue[tuple[trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(gw.run)
            started.put((trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(serve,), name="fake-gateway", daemon=True)
    thread.start()
    token, scope = started.get(timeout=5)

    def stop() -> None:
        if thread.is_alive():
            trio.from_thread.run_sync(scope.cancel, trio_token=token)
            thread.join(timeout=5)
        assert not thread.is_alive(), "the fake gateway thread did not stop"

    try:
        yield gw, stop
    finally:
        stop()
        ctx.term()


@pytest.fixture
def thread_gateway() -> Iterator[FakeGateway]:
    """A fake gateway served by its own ``trio.run`` in a background thread (for Client)."""
    with gateway_in_thread() as (gw, _):
        yield gw
