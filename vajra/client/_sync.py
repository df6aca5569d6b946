"""The blocking client: one DEALER per thread, waits bounded by each call's deadline.

No ZeroMQ socket is thread-safe, so each thread that calls the client gets its own
:class:`~vajra.bus.client_socket.BlockingDealer` (kept in a ``threading.local``); all of them
share the client's one :class:`~vajra.bus.client_socket.BlockingContext`. A thread reads only
its own socket, so no locks are held while waiting.

One thread may have several calls open at once (an :meth:`Client.infer` inside a loop over
:meth:`Client.stream`): whichever call is reading parks replies meant for the thread's other
open calls in their inboxes. Replies for no open call of the thread (late replies to calls
that timed out, frames that do not decode) are counted in :attr:`Client.ignored_replies`,
logged at debug level and dropped.

As in the Trio client, an abandoned generation (deadline passed, stream closed early) is
cancelled at the gateway, and a dropped connection to the gateway (reported by the bus's
connection monitor, per thread) fails the thread's open calls at once with a retriable
:class:`~vajra.errors.UnavailableError`. What each call sends and returns is built by
:class:`~vajra.client._calls.Calls`, as for the Trio client.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TypeVar, Unpack

from vajra.bus.client_socket import BlockingContext, BlockingDealer
from vajra.bus.messages import ErrorReply, InferRequest
from vajra.client._adapters_sync import AdaptersMixin
from vajra.client._calls import Call, Calls
from vajra.client._choices import read_as_stream
from vajra.client._decoding import SamplingOptions, sampling_params
from vajra.client._fanout_sync import infer_all, stream_all
from vajra.client._jobs import JobsMixin
from vajra.client._replies import Reply, StreamProgress, decode_reply, expect, interpret_reply
from vajra.client._requests import Request, cancel_frames, request_frames
from vajra.client._types import InferenceResult, StreamChunk
from vajra.client._usage import UsageReport, When
from vajra.errors import InvalidRequest, TimeoutError, UnavailableError
from vajra.policies.decoding import SamplingParams

log = logging.getLogger("vajra.client")

T = TypeVar("T")


class _ThreadState:
    """One thread's socket (with its connection monitor), and an inbox per open call."""

    __slots__ = ("__weakref__", "dealer", "inbox")

    def __init__(self, dealer: BlockingDealer) -> None:
        self.dealer = dealer
        self.inbox: dict[str, deque[Reply]] = {}


def _timed_out(request_id: str, timeout_s: float) -> TimeoutError:
    return TimeoutError(f"no answer to request {request_id} within {timeout_s:g} s")


class Client(JobsMixin, AdaptersMixin):
    """Talks to a Vajra gateway from ordinary (blocking) code; safe to share between threads.

    ::

        with Client("tcp://127.0.0.1:5555", api_key) as client:
            print(client.infer("Hello", max_tokens=16).text)
            for chunk in client.stream("Hello"):
                print(chunk.text, end="")

    Every call runs under one deadline of ``timeout_s`` (the call's, or the client's
    default), which is also sent to the gateway as the request's ``deadline_ms``; when it
    passes the call raises :class:`vajra.errors.TimeoutError` (also a builtin
    ``TimeoutError``). Arguments the gateway would refuse for any cluster raise
    :class:`~vajra.errors.InvalidRequest` before anything is sent; gateway errors are raised
    as the matching :class:`~vajra.errors.VajraError` subclass.

    :meth:`close` closes every thread's socket; call it once the other threads' calls have
    returned (ZeroMQ sockets cannot be closed under a thread that is using them).
    """

    def __init__(
        self,
        address: str,
        api_key: str,
        *,
        tenant: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self.address = address
        self._calls = Calls(api_key, tenant, timeout_s)
        self._max_upload_bytes: int | None = None  # asked of the gateway on the first push
        self._ctx = BlockingContext()
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _states, _ignored and _closed
        self._states: weakref.WeakSet[_ThreadState] = weakref.WeakSet()
        self._closed = False
        self._ignored = 0
        self.disconnects = 0  # times a thread's connection to the gateway dropped
        self.cancels_sent = 0  # abandoned generations cancelled at the gateway

    @property
    def ignored_replies(self) -> int:
        """Replies dropped because no open call of the receiving thread could take them."""
        return self._ignored

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's socket and the context; later calls raise UnavailableError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            states = list(self._states)
        for state in states:
            state.dealer.close()
        self._ctx.close()  # also closes any socket a finalizer has not reached yet

    def _state(self) -> _ThreadState:
        """This thread's socket, connected on first use."""
        if self._closed:
            raise UnavailableError("the client is closed")
        state: _ThreadState | None = getattr(self._local, "state", None)
        if state is not None:
            return state
        with self._lock:
            if self._closed:
                raise UnavailableError("the client is closed")
            try:
                dealer = self._ctx.dealer(self.address)
            except ValueError as exc:
                raise InvalidRequest(str(exc), field="address") from None
            state = _ThreadState(dealer)
            # A thread that ends drops its state; its sockets are closed then, not leaked.
            weakref.finalize(state, dealer.close)
            self._states.add(state)
        self._local.state = state
        return state

    # --- one call ------------------------------------------------------------------------

    @contextmanager
    def _register(self, state: _ThreadState, request_id: str) -> Iterator[None]:
        if request_id in state.inbox:
            raise RuntimeError(f"request id {request_id} is already outstanding")
        state.inbox[request_id] = deque()
        try:
            yield
        finally:
            state.inbox.pop(request_id, None)

    def _send(
        self,
        state: _ThreadState,
        request: Request,
        deadline: float,
        timeout_s: float,
        bulk: Sequence[bytes] = (),
    ) -> None:
        if not state.dealer.send(request_frames(request, bulk), deadline):
            raise _timed_out(request.request_id, timeout_s)

    def _next_reply(
        self, state: _ThreadState, request_id: str, deadline: float, timeout_s: float
    ) -> Reply:
        """The next reply for ``request_id``, reading the socket until one comes."""
        inbox = state.inbox[request_id]
        while not inbox:
            if self._closed:
                raise UnavailableError("the client was closed before the answer came")
            if time.monotonic() >= deadline:
                raise _timed_out(request_id, timeout_s)
            frames, dropped = state.dealer.receive(deadline)
            if dropped:
                self._on_disconnect(state)
            if frames is not None:
                self._route(state, frames)
        return inbox.popleft()

    def _on_disconnect(self, state: _ThreadState) -> None:
        """A dropped connection fails every open call of the thread (they died with it)."""
        with self._lock:
            self.disconnects += 1
        for inbox in state.inbox.values():
            inbox.append(
                UnavailableError(
                    "the connection to the gateway was lost before the answer came; retry"
                )
            )

    def _cancel(self, state: _ThreadState, request: Request) -> None:
        """Tell the gateway that ``request`` was abandoned (never blocks, never raises)."""
        frames = cancel_frames(request)
        if frames is None or self._closed:
            return
        # A full or closed socket drops it: the gateway's deadline still ends the request.
        if state.dealer.try_send(frames):
            with self._lock:
                self.cancels_sent += 1

    def _route(self, state: _ThreadState, frames: Sequence[bytes]) -> None:
        rid, reply = decode_reply(frames)
        target = state.inbox.get(rid)
        if target is None:
            with self._lock:
                self._ignored += 1
            log.debug("ignoring a reply for no outstanding request (%r): %r", rid, reply)
            return
        target.append(reply)

    def _run(self, call: Call[T]) -> T:
        """Send ``call``'s request and return its final answer as the call's value."""
        request, timeout_s = call.request, call.timeout_s
        state = self._state()
        deadline = time.monotonic() + timeout_s
        with self._register(state, request.request_id):
            self._send(state, request, deadline, timeout_s, call.bulk)
            answered = False
            try:
                while True:
                    reply = self._next_reply(state, request.request_id, deadline, timeout_s)
                    answered = isinstance(reply, ErrorReply)
                    outcome = interpret_reply(reply)
                    if outcome is not None:
                        answered = True
                        return call.finish(outcome)
            finally:
                if not answered:
                    self._cancel(state, request)

    # --- public API ----------------------------------------------------------------------

    def infer(
        self,
        prompt: str,
        adapter: str | None = None,
        *,
        params: SamplingParams | None = None,
        n: int = 1,
        timeout_s: float | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> InferenceResult:
        """Generate a completion for ``prompt`` and return it whole.

        Decoding: ``params`` and/or the keywords of :class:`~vajra.client.SamplingOptions`
        (``max_tokens=32, temperature=0.7, logprobs=5, ...``; keywords override ``params``).
        ``n`` (1..16) asks for that many choices, sent together (``result.choices``).
        """
        decoding = sampling_params(params, sampling)
        streamed = read_as_stream(decoding)
        requests, timeout = self._calls.generation(
            prompt, adapter=adapter, params=decoding, timeout_s=timeout_s, stream=streamed, n=n
        )
        if len(requests) == 1 and not streamed:
            return self._run(self._calls.infer(requests[0], timeout))
        return infer_all(self, requests, timeout, streamed=streamed)

    def stream(
        self,
        prompt: str,
        adapter: str | None = None,
        *,
        params: SamplingParams | None = None,
        n: int = 1,
        timeout_s: float | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> Generator[StreamChunk, None, None]:
        """A streaming generation, as a generator of :class:`~vajra.client.StreamChunk`.

        Takes what :meth:`infer` takes. Arguments are checked at once; the request is sent
        when iteration starts, and the whole stream runs under one deadline from then. The
        last chunk has ``finish_reason`` and ``usage`` set (``n > 1``: each choice's last
        chunk, ``chunk.choice`` saying whose). Iterate it in the thread that started it.
        Stopping early (or closing the generator) abandons the request: its remaining chunks
        are dropped.
        """
        decoding = sampling_params(params, sampling)
        requests, timeout = self._calls.generation(
            prompt, adapter=adapter, params=decoding, timeout_s=timeout_s, stream=True, n=n
        )
        if len(requests) == 1:
            return self._stream(requests[0], timeout)
        return stream_all(self, requests, timeout)

    def _stream(
        self, request: InferRequest, timeout_s: float
    ) -> Generator[StreamChunk, None, None]:
        state = self._state()
        deadline = time.monotonic() + timeout_s
        progress = StreamProgress()
        with self._register(state, request.request_id):
            self._send(state, request, deadline, timeout_s)
            answered = False
            try:
                while not progress.finished:
                    reply = self._next_reply(state, request.request_id, deadline, timeout_s)
                    answered = isinstance(reply, ErrorReply)
                    chunk = expect(interpret_reply(reply, progress), StreamChunk)
                    answered = progress.finished
                    yield chunk
            finally:  # also when the caller stops early (GeneratorExit)
                if not answered:
                    self._cancel(state, request)

    def stats(self, *, timeout_s: float | None = None) -> dict[str, int]:
        """The gateway's counters (this client's key must be a tenant's or the admin key)."""
        return self._run(self._calls.stats(timeout_s))

    def ping(self, *, timeout_s: float | None = None) -> None:
        """Return once the gateway answers (no key needed); TimeoutError if it does not."""
        self._run(self._calls.ping(timeout_s))

    def usage(
        self,
        tenant: str | None = None,
        start: When = None,
        end: When = None,
        group_by: str | None = None,
        *,
        timeout_s: float | None = None,
    ) -> UsageReport:
        """As :meth:`AsyncClient.usage`: totals and the day buckets in ``[start, end)``."""
        call = self._calls.usage(tenant, timeout_s, start=start, end=end, group_by=group_by)
        return self._run(call)
