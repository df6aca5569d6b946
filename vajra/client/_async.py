"""The Trio client: one DEALER socket, one receive task, one bounded reply queue per request.

Data flows left to right::

    caller ──request frames──▶ DEALER ──▶ gateway
    gateway ──▶ DEALER ──▶ receive task ──(by request_id)──▶ the call's memory channel ──▶ caller

The receive task never waits on a caller: each request's queue is sized to the most replies
the protocol allows it, so one slow reader cannot stall the others; a gateway that sends more
fails that request with :class:`~vajra.errors.ProtocolError`. Replies for requests that are
no longer outstanding (timed out, abandoned, unknown, or frames that do not decode at all)
are counted in :attr:`AsyncClient.ignored_replies`, logged at debug level and dropped.

A generation that is abandoned before its answer (its deadline passed, the caller was
cancelled, a stream left early) is cancelled at the gateway with a ``CancelRequest``, so its
executor stops computing (and billing) it. When the connection to the gateway drops (a socket
monitor reports it), every outstanding call fails at once with a retriable
:class:`~vajra.errors.UnavailableError` instead of waiting out its deadline: whatever the
gateway held died with it. ZeroMQ reconnects by itself; later calls go to the new gateway.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractAsyncContextManager, ExitStack, contextmanager
from types import TracebackType
from typing import Any

import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from vajra.bus.messages import (
    AdminReply,
    AdminRequest,
    ClusterStatusReply,
    ClusterStatusRequest,
    ErrorReply,
    InferRequest,
    PingRequest,
    PongReply,
    TenantInfo,
    UsageQuery,
    UsageReply,
    WhoAmIRequest,
)
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.client._types import (
    AdapterInfo,
    ExecutorStatus,
    InferenceResult,
    IssuedKey,
    Reply,
    Request,
    StreamChunk,
    StreamProgress,
    Tenant,
    TenantUsage,
    adapter_infos,
    build_adapter_delete,
    build_adapter_list,
    build_adapter_push,
    build_infer_request,
    build_stats_request,
    cancel_frames,
    check_upload_size,
    decode_reply,
    expect,
    interpret_reply,
    new_request_id,
    read_adapter_dir,
    reply_capacity,
    request_frames,
    resolve_timeout,
    single_adapter,
)
from vajra.errors import InvalidRequest, ProtocolError, TimeoutError, UnavailableError, VajraError

log = logging.getLogger("vajra.client")

_RECV_BATCH = 256


class _Call:
    """One outstanding request: the receive task feeds ``send``, the caller reads ``receive``.

    ``failure`` says why ``send`` was closed early (client closed, reply queue overflowed).
    """

    __slots__ = ("failure", "receive", "request_id", "send")

    def __init__(self, request_id: str, capacity: int) -> None:
        self.request_id = request_id
        self.send, self.receive = trio.open_memory_channel[Reply](capacity)
        self.failure: VajraError | None = None


@contextmanager
def _within(deadline: float, request_id: str, timeout_s: float) -> Iterator[None]:
    """``trio.fail_at(deadline)`` with ``TooSlowError`` turned into Vajra's TimeoutError."""
    try:
        with trio.fail_at(deadline):
            yield
    except trio.TooSlowError:
        raise TimeoutError(f"no answer to request {request_id} within {timeout_s:g} s") from None


class AsyncClient:
    """Talks to a Vajra gateway from Trio.

    ::

        async with AsyncClient("tcp://127.0.0.1:5555", api_key) as client:
            result = await client.infer("Hello", max_tokens=16)
            async with client.stream("Hello") as chunks:
                async for chunk in chunks:
                    print(chunk.text, end="")

    Opening connects one DEALER socket and starts one receive task in the client's own
    nursery. Closing (leaving the ``async with``) cancels that task, fails every request
    still outstanding with :class:`~vajra.errors.UnavailableError` and closes the socket.
    Any number of tasks may call the client at once; replies are routed by request id.

    Every call runs under one deadline of ``timeout_s`` (the call's, or the client's
    default), which is also sent to the gateway as the request's ``deadline_ms``; when it
    passes the call raises :class:`vajra.errors.TimeoutError` (also a builtin
    ``TimeoutError``). Cancelling a call abandons the request: its late replies are dropped.
    Gateway errors are raised as the matching :class:`~vajra.errors.VajraError` subclass.
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
        self._api_key = api_key
        self._tenant = tenant
        self._max_upload_bytes: int | None = None  # asked of the gateway on the first push
        self._timeout_s = resolve_timeout(timeout_s, timeout_s)
        self._ctx: zmq.Context[Any] | None = None
        self._sock: ZSocket | None = None
        self._monitor: ZSocket | None = None
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None
        self._calls: dict[str, _Call] = {}
        self._opened = False
        self._closed = False
        self._ignored = 0
        self.disconnects = 0  # times the connection to the gateway dropped
        self.cancels_sent = 0  # abandoned generations cancelled at the gateway

    @property
    def ignored_replies(self) -> int:
        """Replies dropped because no outstanding request of this client could take them."""
        return self._ignored

    # --- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        if self._opened:
            raise RuntimeError("an AsyncClient can be opened only once")
        self._opened = True
        self._ctx = zmq.Context()
        self._sock = open_socket(self._ctx, zmq.DEALER)
        try:
            self._sock.connect(self.address)
        except zmq.ZMQError as exc:
            self._shutdown()
            raise InvalidRequest(
                f"cannot connect to {self.address!r}: {exc}", field="address"
            ) from None
        self._monitor = ZSocket(self._sock.raw.get_monitor_socket(zmq.EVENT_DISCONNECTED))
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        self._nursery.start_soon(self._receive_loop, self._sock)
        self._nursery.start_soon(self._watch_connection, self._monitor)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._nursery is not None and self._nursery_manager is not None
        self._nursery.cancel_scope.cancel()
        try:
            # The body's own exception is not handed to the nursery, so it propagates as it
            # is (not wrapped in an ExceptionGroup); only a crash of the receive task would.
            await self._nursery_manager.__aexit__(None, None, None)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self._closed = True
        for call in list(self._calls.values()):
            self._fail(call, UnavailableError("the client was closed before the answer came"))
        if self._monitor is not None:
            self._monitor.close()
        if self._sock is not None:
            self._sock.close()
        if self._ctx is not None:
            self._ctx.term()  # returns at once: the only socket is closed with linger 0

    def _open_socket(self) -> ZSocket:
        if self._closed:
            raise UnavailableError("the client is closed")
        if self._sock is None:
            raise RuntimeError("open the client first: `async with AsyncClient(...) as client`")
        return self._sock

    # --- the receive side ----------------------------------------------------------------

    async def _receive_loop(self, sock: ZSocket) -> None:
        """Owns the socket's receive side; dispatches every reply. Runs until cancelled."""
        while True:
            for frames in await sock.recv_batch(_RECV_BATCH):
                self._dispatch(frames)

    async def _watch_connection(self, monitor: ZSocket) -> None:
        """Fail every outstanding call when the connection to the gateway drops."""
        while True:
            for frames in await monitor.recv_batch(_RECV_BATCH):
                try:
                    event = parse_monitor_message(frames)["event"]
                except (ValueError, KeyError, IndexError):  # not an event we understand
                    continue
                if event != zmq.EVENT_DISCONNECTED:
                    continue
                self.disconnects += 1
                lost = UnavailableError(
                    "the connection to the gateway was lost before the answer came; retry"
                )
                for call in list(self._calls.values()):
                    self._fail(call, lost)

    def _dispatch(self, frames: Sequence[bytes]) -> None:
        request_id, reply = decode_reply(frames)
        call = self._calls.get(request_id)
        if call is None:
            self._ignored += 1
            log.debug("ignoring a reply for no outstanding request (%r): %r", request_id, reply)
            return
        try:
            call.send.send_nowait(reply)
        except trio.WouldBlock:
            self._fail(
                call, ProtocolError(f"request {request_id} got more replies than it can have")
            )
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._calls.pop(request_id, None)

    def _fail(self, call: _Call, error: VajraError) -> None:
        """End ``call`` early: its reader drains what came, then gets ``error``."""
        if self._calls.get(call.request_id) is call:
            del self._calls[call.request_id]
        if call.failure is None:
            call.failure = error
        call.send.close()

    # --- one call --------------------------------------------------------------------------

    @contextmanager
    def _register(self, request: Request) -> Iterator[_Call]:
        """Make ``request`` outstanding (before it is sent); forget it on the way out."""
        self._open_socket()
        rid = request.request_id
        if rid in self._calls:
            raise RuntimeError(f"request id {rid} is already outstanding")
        call = _Call(rid, reply_capacity(request))
        self._calls[rid] = call
        try:
            yield call
        finally:
            if self._calls.get(rid) is call:
                del self._calls[rid]
            call.send.close()
            call.receive.close()

    async def _send(self, request: Request, bulk: Sequence[bytes] = ()) -> None:
        sock = self._open_socket()
        try:
            await sock.send(request_frames(request, bulk))
        except trio.ClosedResourceError:
            raise UnavailableError("the client was closed while sending") from None

    @staticmethod
    async def _next_reply(call: _Call) -> Reply:
        try:
            return await call.receive.receive()
        except trio.EndOfChannel:
            return call.failure or UnavailableError("the request was abandoned")

    def _cancel(self, request: Request) -> None:
        """Tell the gateway that ``request`` was abandoned (never blocks, never raises)."""
        frames = cancel_frames(request)
        if frames is None or self._closed or self._sock is None:
            return
        try:
            if self._sock.send_nowait(frames):
                self.cancels_sent += 1
        except (zmq.ZMQError, trio.ClosedResourceError):
            pass  # the socket is going away: so is the gateway's reason to compute

    async def _single(
        self, request: Request, timeout_s: float, bulk: Sequence[bytes] = ()
    ) -> InferenceResult | StreamChunk | dict[str, int] | object:
        """Send ``request`` (with its ``bulk`` frames) and wait for its one final answer.

        Leaving without that answer (deadline, cancellation, a local failure) cancels it.
        """
        deadline = trio.current_time() + timeout_s
        with self._register(request) as call, _within(deadline, request.request_id, timeout_s):
            await self._send(request, bulk)
            answered = False
            try:
                while True:
                    reply = await self._next_reply(call)
                    answered = isinstance(reply, ErrorReply)
                    outcome = interpret_reply(reply)
                    if outcome is not None:
                        answered = True
                        return outcome
            finally:
                if not answered:
                    self._cancel(request)

    # --- public API ------------------------------------------------------------------------

    async def infer(
        self,
        prompt: str,
        adapter: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        timeout_s: float | None = None,
    ) -> InferenceResult:
        """Generate a completion for ``prompt`` and return it whole."""
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        request = build_infer_request(
            api_key=self._api_key,
            tenant=self._tenant,
            prompt=prompt,
            adapter=adapter,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            stream=False,
            timeout_s=timeout,
        )
        return expect(await self._single(request, timeout), InferenceResult)

    def stream(
        self,
        prompt: str,
        adapter: str | None = None,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
        timeout_s: float | None = None,
    ) -> Stream:
        """A streaming generation; use as ``async with client.stream(...) as chunks``.

        Nothing is sent until the ``async with`` is entered; see :class:`Stream`.
        """
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        request = build_infer_request(
            api_key=self._api_key,
            tenant=self._tenant,
            prompt=prompt,
            adapter=adapter,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            stream=True,
            timeout_s=timeout,
        )
        return Stream(self, request, timeout)

    async def stats(self, *, timeout_s: float | None = None) -> dict[str, int]:
        """The gateway's counters (this client's key must be a tenant's or the admin key)."""
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        request = build_stats_request(self._api_key)
        counters: dict[str, int] = expect(await self._single(request, timeout), dict)
        return counters

    async def ping(self, *, timeout_s: float | None = None) -> None:
        """Return once the gateway answers (no key needed); TimeoutError if it does not."""
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        expect(await self._single(PingRequest(request_id=new_request_id()), timeout), PongReply)

    # --- adapters ----------------------------------------------------------------------------

    async def push_adapter(
        self, path: str | os.PathLike[str], name: str, *, timeout_s: float | None = None
    ) -> AdapterInfo:
        """Upload the PEFT adapter in directory ``path`` as the next version of ``name``.

        The new version becomes active. The gateway validates it before storing anything;
        a refused adapter raises InvalidRequest naming the problem.
        """
        config_json, weights = await trio.to_thread.run_sync(read_adapter_dir, path)
        return await self.push_adapter_bytes(config_json, weights, name, timeout_s=timeout_s)

    async def push_adapter_bytes(
        self, config_json: bytes, weights: bytes, name: str, *, timeout_s: float | None = None
    ) -> AdapterInfo:
        """Like :meth:`push_adapter`, from the bytes of ``adapter_config.json`` and
        ``adapter_model.safetensors`` (for callers that hold them in memory, like the bridge)."""
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        check_upload_size(config_json, weights, await self._upload_limit(timeout))
        request = build_adapter_push(api_key=self._api_key, tenant=self._tenant, name=name)
        return single_adapter(await self._single(request, timeout, (config_json, weights)))

    async def _upload_limit(self, timeout_s: float) -> int:
        """The gateway's upload limit (asked once per client; 0 if it does not say)."""
        if self._max_upload_bytes is None:
            request = WhoAmIRequest(request_id=new_request_id(), api_key=self._api_key)
            info = expect(await self._single(request, timeout_s), TenantInfo)
            self._max_upload_bytes = info.max_adapter_bytes
        return self._max_upload_bytes

    async def list_adapters(self, *, timeout_s: float | None = None) -> list[AdapterInfo]:
        """Every version of every adapter of this key's tenant, by name then version."""
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        request = build_adapter_list(api_key=self._api_key, tenant=self._tenant)
        return adapter_infos(await self._single(request, timeout))

    async def delete_adapter(
        self, name: str, version: int | None = None, *, timeout_s: float | None = None
    ) -> list[AdapterInfo]:
        """Delete one version (``version``, or ``name`` as ``NAME@VERSION``) or the whole name.

        Returns the deleted versions; NotFoundError if there is no such adapter or version.
        """
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        request = build_adapter_delete(
            api_key=self._api_key, tenant=self._tenant, name=name, version=version
        )
        return adapter_infos(await self._single(request, timeout))

    def with_api_key(self, api_key: str, *, tenant: str | None = None) -> AsyncClient:
        """A view of this open client that sends its requests with ``api_key`` (and ``tenant``).

        The view shares this client's connection, receive task and default timeout, so a
        server speaking for many callers (the HTTP bridge) keeps one connection and passes
        each caller's key. It is valid while this client is open and is never entered itself.
        """
        view = copy.copy(self)
        view._api_key = api_key
        view._tenant = tenant
        return view

    async def whoami(self, *, timeout_s: float | None = None) -> Tenant:
        """The tenant this client's API key belongs to (AuthError for a bad or revoked key)."""
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        request = WhoAmIRequest(request_id=new_request_id(), api_key=self._api_key)
        info = expect(await self._single(request, timeout), TenantInfo)
        return Tenant(info.tenant_id, info.name)

    async def usage(
        self, tenant: str | None = None, *, timeout_s: float | None = None
    ) -> TenantUsage:
        """This key's tenant's usage totals; ``tenant`` (id or name) other than its own: NotFoundError."""
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        request = UsageQuery(request_id=new_request_id(), api_key=self._api_key, tenant=tenant)
        u = expect(await self._single(request, timeout), UsageReply)
        return TenantUsage(
            u.tenant_id, u.name, u.requests, u.gpu_ms, u.prompt_tokens, u.completion_tokens
        )

    async def cluster_status(self, *, timeout_s: float | None = None) -> list[ExecutorStatus]:
        """Every live executor's last heartbeat (a tenant's key or the admin key, like
        :meth:`stats`)."""
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        request = ClusterStatusRequest(request_id=new_request_id(), api_key=self._api_key)
        reply = expect(await self._single(request, timeout), ClusterStatusReply)
        return [
            ExecutorStatus(*row)
            for row in zip(
                reply.executor_ids,
                reply.queue_depths,
                reply.running,
                reply.resident_adapters,
                reply.free_memory_bytes,
                strict=False,
            )
        ]

    async def _admin(
        self,
        action: str,
        *,
        tenant: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None,
    ) -> AdminReply:
        """One admin request; this client's API key must be the cluster's admin key."""
        timeout = resolve_timeout(timeout_s, self._timeout_s)
        request = AdminRequest(
            request_id=new_request_id(),
            admin_key=self._api_key,
            action=action,
            tenant=tenant,
            api_key=api_key,
        )
        return expect(await self._single(request, timeout), AdminReply)

    async def create_tenant(self, name: str, *, timeout_s: float | None = None) -> IssuedKey:
        """Admin: create a tenant and its first API key."""
        r = await self._admin("create_tenant", tenant=name, timeout_s=timeout_s)
        return IssuedKey(r.tenant_id, r.name, r.api_key or "")

    async def create_api_key(self, tenant: str, *, timeout_s: float | None = None) -> IssuedKey:
        """Admin: issue another API key for ``tenant`` (a name or id)."""
        r = await self._admin("create_key", tenant=tenant, timeout_s=timeout_s)
        return IssuedKey(r.tenant_id, r.name, r.api_key or "")

    async def revoke_api_key(self, api_key: str, *, timeout_s: float | None = None) -> None:
        """Admin: revoke ``api_key``; the gateway refuses it from its next request on."""
        await self._admin("revoke_key", api_key=api_key, timeout_s=timeout_s)

    async def delete_tenant(self, tenant: str, *, timeout_s: float | None = None) -> None:
        """Admin: delete ``tenant`` (a name or id) and all its keys."""
        await self._admin("delete_tenant", tenant=tenant, timeout_s=timeout_s)


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

    def __init__(self, client: AsyncClient, request: InferRequest, timeout_s: float) -> None:
        self._client = client
        self._request = request
        self._timeout_s = timeout_s
        self._progress = StreamProgress()
        self._call: _Call | None = None
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
            self._call = stack.enter_context(self._client._register(self._request))
            self._deadline = trio.current_time() + self._timeout_s
            with _within(self._deadline, self.request_id, self._timeout_s):
                await self._client._send(self._request)
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
                self._client._cancel(self._request)
            self._stack.close()

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._call is None:
            raise RuntimeError("enter the stream first: `async with client.stream(...) as s`")
        if self._progress.finished:
            raise StopAsyncIteration
        try:
            with _within(self._deadline, self.request_id, self._timeout_s):
                reply = await self._client._next_reply(self._call)
        except TimeoutError:
            self._progress.finished = True
            raise
        self._answered = isinstance(reply, ErrorReply)
        chunk = expect(interpret_reply(reply, self._progress), StreamChunk)
        self._answered = self._progress.finished
        return chunk
