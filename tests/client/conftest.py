"""Fixtures for the client tests: the fake gateway, in this Trio run or in its own thread."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import trio
from fake_gateway import FakeGateway, gateway_in_thread

from vajra.bus.zsocket import Context, new_context


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    """A fake gateway served by a task of the test's own Trio run."""
    ctx: Context[Any] = new_context()
    gw = FakeGateway(ctx)
    async with trio.open_nursery() as nursery:
        await nursery.start(gw.run)
        yield gw
        nursery.cancel_scope.cancel()
    ctx.term()


@pytest.fixture
def thread_gateway() -> Iterator[FakeGateway]:
    """A fake gateway served by its own ``trio.run`` in a background thread (for Client)."""
    with gateway_in_thread() as (gw, _):
        yield gw
