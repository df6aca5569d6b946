"""The Trio client's calls of several requests at once: ``n`` choices, and results that are
read as streams (see :mod:`vajra.client._choices`).

Every request of a call runs in a task of one nursery; the first error cancels the others
(each is then cancelled at the gateway, as any abandoned request is) and is raised as it is,
never wrapped in an exception group.
"""

from __future__ import annotations

import dataclasses
from contextlib import AsyncExitStack
from types import TracebackType

import trio

from vajra.bus.messages import InferRequest
from vajra.client._calls import Calls
from vajra.client._choices import base_request_id, gather, merge
from vajra.client._session import Session
from vajra.client._stream import Stream
from vajra.client._types import InferenceResult, StreamChunk
from vajra.errors import VajraError


async def infer_all(
    session: Session, requests: list[InferRequest], timeout_s: float, *, streamed: bool
) -> InferenceResult:
    """Send ``requests`` together and merge their results (``streamed``: each read as a
    stream and gathered)."""
    results: list[InferenceResult | None] = [None] * len(requests)
    failure: VajraError | None = None

    async def one(i: int, request: InferRequest, scope: trio.CancelScope) -> None:
        nonlocal failure
        try:
            if streamed:
                async with Stream(session, request, timeout_s) as chunks:
                    results[i] = gather([c async for c in chunks])
            else:
                result = await session.run(Calls.infer(request, timeout_s))
                results[i] = result
        except VajraError as exc:
            if failure is None:
                failure = exc
            scope.cancel()

    async with trio.open_nursery() as nursery:
        for i, request in enumerate(requests):
            nursery.start_soon(one, i, request, nursery.cancel_scope)
    if failure is not None:
        raise failure
    done = [r for r in results if r is not None]
    assert len(done) == len(requests), "every task ended with a result or a failure"
    return merge(done, base_request_id(requests))


class FanoutStream:
    """The streams of an ``n > 1`` call, made by :meth:`AsyncClient.stream`, read as one.

    Used like :class:`~vajra.client.Stream`: entering sends every request; iterating yields
    the choices' chunks as they come (``chunk.choice`` says whose), until every choice's
    final chunk has come. An error of any choice is raised from the iteration; leaving the
    block early abandons every choice still running (each is cancelled at the gateway).
    """

    def __init__(self, session: Session, requests: list[InferRequest], timeout_s: float) -> None:
        self._streams = [Stream(session, r, timeout_s) for r in requests]
        self.request_id = base_request_id(requests)
        self._send, self._receive = trio.open_memory_channel[StreamChunk | VajraError](0)
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        self._open = len(requests)  # choices whose final chunk has not come

    async def __aenter__(self) -> FanoutStream:
        if self._stack is not None:
            raise RuntimeError("a FanoutStream can be entered only once")
        async with AsyncExitStack() as stack:
            for s in self._streams:
                await stack.enter_async_context(s)
            nursery = await stack.enter_async_context(trio.open_nursery())
            for i, s in enumerate(self._streams):
                nursery.start_soon(self._pump, i, s)
            self._nursery = nursery
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = 0
        if self._stack is not None and self._nursery is not None:
            self._nursery.cancel_scope.cancel()
            await self._stack.aclose()  # the pumps end, then every stream is left

    async def _pump(self, choice: int, stream: Stream) -> None:
        try:
            async for chunk in stream:
                await self._send.send(dataclasses.replace(chunk, choice=choice))
        except VajraError as exc:
            await self._send.send(exc)

    def __aiter__(self) -> FanoutStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._nursery is None:
            raise RuntimeError("enter the stream first: `async with client.stream(...) as s`")
        if self._open == 0:
            raise StopAsyncIteration
        item = await self._receive.receive()
        if isinstance(item, VajraError):
            self._open = 0
            raise item
        if item.is_final:
            self._open -= 1
        return item
