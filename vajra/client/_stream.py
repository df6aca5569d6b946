"""One streaming generation of the Trio client, read chunk by chunk under one deadline."""

from __future__ import annotations

from contextlib import ExitStack
from types import TracebackType

import trio

from vajra.bus.messages import ErrorReply, InferRequest
from vajra.client._replies import StreamProgress, expect, interpret_reply
from vajra.client._session import Pending, Session, within
from vajra.client._types import StreamChunk
from vajra.errors import TimeoutError


class Stream:
    """One streaming request, made by :meth:`AsyncClient.stream`.

    ::

        async with client.stream("Once upon a time", max_tokens=32) as chunks:
            async for chunk in chunks:
                ...  # the last chunk has finish_reason and usage set

    Entering sends the request and starts its deadline; iterating yields
    :class:`~vajra.client.StreamChunk` objects until the final one. The whole stream, from
    entering to its final chunk, runs under one deadline of ``timeout_s``; when it passes,
    iterating raises :class:`vajra.errors.TimeoutError`. A gateway error is raised from the
    iteration. Leaving the block early (``break``, an error, cancellation, the deadline)
    abandons the request: it is cancelled at the gateway (its executor stops generating and
    bills only what it computed) and chunks still on their way are dropped.
    """

    def __init__(self, session: Session, request: InferRequest, timeout_s: float) -> None:
        self._session = session
        self._request = request
        self._timeout_s = timeout_s
        self._progress = StreamProgress()
        self._pending: Pending | None = None
        self._stack: ExitStack | None = None
        self._deadline = 0.0
        self._answered = False  # the final chunk or the gateway's error came

    @property
    def request_id(self) -> str:
        return self._request.request_id

    @property
    def text(self) -> str:
        """The text streamed so far."""
        return self._progress.text

    async def __aenter__(self) -> Stream:
        if self._stack is not None:
            raise RuntimeError("a Stream can be entered only once")
        with ExitStack() as stack:
            self._pending = stack.enter_context(self._session.register(self._request))
            self._deadline = trio.current_time() + self._timeout_s
            with within(self._deadline, self.request_id, self._timeout_s):
                await self._session.send(self._request)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.finished = True
        if self._stack is not None:
            if not self._answered:
                self._session.cancel(self._request)
            self._stack.close()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._pending is None:
            raise RuntimeError("enter the stream first: `async with client.stream(...) as s`")
        if self._progress.finished:
            raise StopAsyncIteration
        try:
            reply = await self._session.next_reply_before(
                self._pending, self._deadline, self._timeout_s
            )
        except TimeoutError:
            self._progress.finished = True
            raise
        self._answered = isinstance(reply, ErrorReply)
        chunk = expect(interpret_reply(reply, self._progress), StreamChunk)
        self._answered = self._progress.finished
        return chunk
