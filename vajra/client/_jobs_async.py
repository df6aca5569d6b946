"""Training jobs in the Trio SDK: the job handle and its progress stream.

::

    job = await client.train("support-bot", "train.jsonl", epochs=3)
    async with job.follow() as progress:
        async for info in progress:
            print(info.status, info.step, info.loss)
    final = await job.wait(timeout_s=3600)

Requests, checks and values are those of :mod:`vajra.client._jobs`. A progress stream holds
at most ``FOLLOW_CAPACITY`` unread changes (one comes per change, at most every
``training.progress_poll_s``); a reader that falls further behind gets ProtocolError.
Leaving the ``async with`` early (or cancellation) ends the stream at the gateway.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import trio

from vajra.bus.codec import encode
from vajra.bus.messages import (
    CancelRequest,
    ErrorReply,
    JobCancel,
    JobGet,
    JobList,
    JobProgress,
    JobReply,
    JobResume,
    JobWatch,
    TrainSubmit,
)
from vajra.client._jobs import (
    DEFAULT_FOLLOW_S,
    DEFAULT_MAX_DATASET_BYTES,
    JobInfo,
    JobRequest,
    build_submit,
    check_job_id,
    job_reply_or_raise,
    job_request,
    jobs_of,
)
from vajra.client._session import Pending, Session
from vajra.errors import InvalidRequest, ProtocolError, TimeoutError, UnavailableError, VajraError

if TYPE_CHECKING:
    from vajra.client._async import AsyncClient

__all__ = ["AsyncJobsMixin", "AsyncTrainingJob", "JobFollow"]

#: Unread progress messages one stream may hold.
FOLLOW_CAPACITY = 256


@contextmanager
def _register(session: Session, request_id: str, capacity: int) -> Iterator[Pending]:
    """Make ``request_id`` outstanding on ``session`` with room for ``capacity`` replies."""
    session._open_connection()
    if request_id in session._pending:
        raise RuntimeError(f"request id {request_id} is already outstanding")
    pending = Pending(request_id, capacity)
    session._pending[request_id] = pending
    try:
        yield pending
    finally:
        if session._pending.get(request_id) is pending:
            del session._pending[request_id]
        pending.send.close()
        pending.receive.close()


async def _send(session: Session, request: JobRequest, bulk: tuple[bytes, ...] = ()) -> None:
    conn = session._open_connection()
    try:
        await conn.send(encode(request, message_id=request.request_id, bulk=bulk))
    except trio.ClosedResourceError:
        raise UnavailableError("the client was closed while sending") from None


async def call(
    session: Session, request: JobRequest, timeout_s: float, bulk: bytes = b""
) -> list[JobInfo]:
    """One job call's answer (its JobReply's jobs); TimeoutError after ``timeout_s``."""
    frames: tuple[bytes, ...] = (bulk,) if isinstance(request, TrainSubmit) else ()
    with _register(session, request.request_id, 4) as pending:
        with trio.move_on_after(timeout_s):
            await _send(session, request, frames)
            while True:
                message = job_reply_or_raise(await session.next_reply(pending))
                if isinstance(message, JobReply):
                    return jobs_of(message)
    raise TimeoutError(f"no answer to request {request.request_id} within {timeout_s:g} s")


class JobFollow:
    """A job's progress stream: ``async with`` it, then ``async for info in it``; the last
    item is the job's final state (or its state when the gateway's follow limit passed)."""

    def __init__(self, session: Session, request: JobWatch, timeout_s: float) -> None:
        self._session = session
        self._request = request
        self._timeout_s = timeout_s
        self._stack = ExitStack()
        self._pending: Pending | None = None
        self._deadline = 0.0
        self._done = False

    async def __aenter__(self) -> JobFollow:
        self._pending = self._stack.enter_context(
            _register(self._session, self._request.request_id, FOLLOW_CAPACITY)
        )
        self._deadline = trio.current_time() + self._timeout_s
        sent = False
        try:
            await _send(self._session, self._request)
            sent = True
        finally:
            if not sent:
                self._stack.close()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._session._conn
        if not self._done and conn is not None:
            req = self._request
            conn.try_send(encode(CancelRequest(req.request_id, req.api_key)))
        self._stack.close()

    def __aiter__(self) -> JobFollow:
        return self

    async def __anext__(self) -> JobInfo:
        if self._pending is None:
            raise RuntimeError("use the stream inside 'async with'")
        while not self._done:
            try:
                reply = await Session.next_reply_before(
                    self._pending, self._deadline, self._timeout_s
                )
            except TimeoutError:
                raise TimeoutError(
                    f"job {self._request.job_id} did not finish within {self._timeout_s:g} s"
                ) from None
            self._done = isinstance(reply, ErrorReply | VajraError)
            message = job_reply_or_raise(reply)
            if isinstance(message, JobProgress):
                return JobInfo.from_wire(message.job)
            if isinstance(message, JobReply):
                self._done = True
                if message.jobs:
                    return JobInfo.from_wire(message.jobs[0])
        raise StopAsyncIteration


class AsyncTrainingJob:
    """A handle on one training job (made by :meth:`AsyncClient.train` / :meth:`AsyncClient.job`)."""

    def __init__(self, client: AsyncClient, job_id: str, info: JobInfo | None = None) -> None:
        self._client = client
        self.job_id = check_job_id(job_id)
        self.last: JobInfo | None = info

    def _req(self, kind: type[JobRequest]) -> Any:
        c = self._client._calls
        return job_request(kind, c.api_key, c.tenant, job_id=self.job_id)

    async def _one(self, kind: type[JobRequest], timeout_s: float | None) -> JobInfo:
        c = self._client._calls
        infos = await call(self._client._session, self._req(kind), c.timeout(timeout_s))
        if len(infos) != 1:
            raise ProtocolError("a job call answered with no job", field="jobs")
        self.last = infos[0]
        return infos[0]

    async def status(self, *, timeout_s: float | None = None) -> JobInfo:
        """The job as it stands (NotFoundError if it is not this tenant's)."""
        return await self._one(JobGet, timeout_s)

    async def cancel(self, *, timeout_s: float | None = None) -> JobInfo:
        """Cancel: a queued job at once, a running one at its executor's next renewal."""
        return await self._one(JobCancel, timeout_s)

    async def resume(self, *, timeout_s: float | None = None) -> JobInfo:
        """Queue a failed or cancelled job again from its last checkpoint."""
        return await self._one(JobResume, timeout_s)

    def follow(self, *, timeout_s: float | None = None) -> JobFollow:
        """The job's progress stream (see :class:`JobFollow`), within ``timeout_s``."""
        timeout = DEFAULT_FOLLOW_S if timeout_s is None else timeout_s
        return JobFollow(self._client._session, self._req(JobWatch), timeout)

    async def wait(self, timeout_s: float | None = None) -> JobInfo:
        """Wait until the job is finished; its final state. TimeoutError after ``timeout_s``."""
        deadline = trio.current_time() + (DEFAULT_FOLLOW_S if timeout_s is None else timeout_s)
        while True:
            left = deadline - trio.current_time()
            if left <= 0:
                raise TimeoutError(f"job {self.job_id} did not finish in time")
            async with self.follow(timeout_s=left) as progress:
                async for info in progress:
                    self.last = info
                    if info.terminal:
                        return info

    def __repr__(self) -> str:
        status = self.last.status if self.last else "?"
        return f"<AsyncTrainingJob {self.job_id} {status}>"


class AsyncJobsMixin:
    """The Trio client's training-job methods (:class:`~vajra.client.AsyncClient` has them)."""

    async def train(
        self,
        adapter: str,
        dataset: str | os.PathLike[str] | bytes,
        *,
        epochs: int | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        max_steps: int | None = None,
        rank: int | None = None,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        seed: int | None = None,
        from_version: int | None = None,
        fresh: bool = False,
        max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES,
        timeout_s: float | None = None,
        **more: Any,
    ) -> AsyncTrainingJob:
        """As :meth:`Client.train <vajra.client.Client.train>`; the dataset file is read in a
        worker thread."""
        client = cast("AsyncClient", self)
        c = client._calls
        params: dict[str, Any] = dict(more, epochs=epochs, learning_rate=learning_rate)
        params.update(batch_size=batch_size, max_steps=max_steps, rank=rank, alpha=alpha)
        params.update(seed=seed, target_modules=target_modules)
        request, data = await trio.to_thread.run_sync(
            lambda: build_submit(
                c.api_key,
                c.tenant,
                adapter,
                dataset,
                params=params,
                from_version=from_version,
                fresh=fresh,
                max_dataset_bytes=max_dataset_bytes,
            )
        )
        infos = await call(client._session, request, c.timeout(timeout_s), data)
        if len(infos) != 1:
            raise ProtocolError("a training submission answered with no job", field="jobs")
        return AsyncTrainingJob(client, infos[0].job_id, infos[0])

    def job(self, job_id: str) -> AsyncTrainingJob:
        """A handle on one of this tenant's jobs (nothing is sent until it is used)."""
        return AsyncTrainingJob(cast("AsyncClient", self), job_id)

    async def jobs(self, *, limit: int = 100, timeout_s: float | None = None) -> list[JobInfo]:
        """This tenant's newest ``limit`` training jobs, newest first."""
        client = cast("AsyncClient", self)
        c = client._calls
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise InvalidRequest("limit must be an integer in [1, 1000]", field="limit")
        request = job_request(JobList, c.api_key, c.tenant, limit=limit)
        return await call(client._session, request, c.timeout(timeout_s))
