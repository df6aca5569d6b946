"""The Trio client: the SDK's public calls over one :class:`~vajra.client._session.Session`.

What each call sends and returns is built by :class:`~vajra.client._calls.Calls`; the session
moves the frames, routes the replies and keeps the deadlines.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Unpack

import trio

from vajra.client._adapter_files import adapter_bytes_from_tensors, read_adapter_dir
from vajra.client._calls import AdapterMetadata, Calls
from vajra.client._choices import read_as_stream
from vajra.client._decoding import SamplingOptions, sampling_params
from vajra.client._fanout_async import FanoutStream, infer_all
from vajra.client._jobs_async import AsyncJobsMixin
from vajra.client._requests import check_upload_size
from vajra.client._session import Session
from vajra.client._stream import Stream
from vajra.client._types import (
    AdapterInfo,
    ExecutorStatus,
    InferenceResult,
    IssuedKey,
    Tenant,
)
from vajra.client._usage import UsageReport, When
from vajra.policies.decoding import SamplingParams


class AsyncClient(AsyncJobsMixin):
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
    Arguments the gateway would refuse for any cluster raise
    :class:`~vajra.errors.InvalidRequest` before anything is sent; gateway errors are raised
    as the matching :class:`~vajra.errors.VajraError` subclass.
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
        self._session = Session(address)
        self._max_upload_bytes: int | None = None  # asked of the gateway on the first push

    @property
    def ignored_replies(self) -> int:
        """Replies dropped because no outstanding request of this client could take them."""
        return self._session.ignored

    @property
    def disconnects(self) -> int:
        """Times the connection to the gateway dropped."""
        return self._session.disconnects

    @property
    def cancels_sent(self) -> int:
        """Abandoned generations cancelled at the gateway."""
        return self._session.cancels_sent

    # --- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        await self._session.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._session.close()

    def with_api_key(self, api_key: str, *, tenant: str | None = None) -> AsyncClient:
        """A view of this open client that sends its requests with ``api_key`` (and ``tenant``).

        The view shares this client's connection, receive task and default timeout, so a
        server speaking for many callers (the HTTP bridge) keeps one connection and passes
        each caller's key. It is valid while this client is open and is never entered itself.
        """
        view = copy.copy(self)
        view._calls = self._calls.for_key(api_key, tenant)
        return view

    # --- generation --------------------------------------------------------------------------

    async def infer(
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
            return await self._session.run(self._calls.infer(requests[0], timeout))
        return await infer_all(self._session, requests, timeout, streamed=streamed)

    def stream(
        self,
        prompt: str,
        adapter: str | None = None,
        *,
        params: SamplingParams | None = None,
        n: int = 1,
        timeout_s: float | None = None,
        **sampling: Unpack[SamplingOptions],
    ) -> Stream | FanoutStream:
        """A streaming generation; use as ``async with client.stream(...) as chunks``.

        Takes what :meth:`infer` takes. Arguments are checked at once; nothing is sent until
        the ``async with`` is entered; see :class:`Stream` (``n > 1``: a
        :class:`~vajra.client.FanoutStream`, whose chunks say their ``choice``).
        """
        decoding = sampling_params(params, sampling)
        requests, timeout = self._calls.generation(
            prompt, adapter=adapter, params=decoding, timeout_s=timeout_s, stream=True, n=n
        )
        if len(requests) == 1:
            return Stream(self._session, requests[0], timeout)
        return FanoutStream(self._session, requests, timeout)

    # --- the gateway and this key's tenant ---------------------------------------------------

    async def stats(self, *, timeout_s: float | None = None) -> dict[str, int]:
        """The gateway's counters (this client's key must be a tenant's or the admin key)."""
        return await self._session.run(self._calls.stats(timeout_s))

    async def ping(self, *, timeout_s: float | None = None) -> None:
        """Return once the gateway answers (no key needed); TimeoutError if it does not."""
        await self._session.run(self._calls.ping(timeout_s))

    async def whoami(self, *, timeout_s: float | None = None) -> Tenant:
        """The tenant this client's API key belongs to (AuthError for a bad or revoked key)."""
        return await self._session.run(self._calls.whoami(timeout_s))

    async def usage(
        self,
        tenant: str | None = None,
        start: When = None,
        end: When = None,
        group_by: str | None = None,
        *,
        timeout_s: float | None = None,
    ) -> UsageReport:
        """This key's tenant's usage: totals, and the day buckets in ``[start, end)``
        (``vajra.client._usage``); ``tenant`` (id or name) other than its own: NotFoundError
        (the admin key must name one). ``report.invoice(prices)`` prices it."""
        call = self._calls.usage(tenant, timeout_s, start=start, end=end, group_by=group_by)
        return await self._session.run(call)

    async def cluster_status(self, *, timeout_s: float | None = None) -> list[ExecutorStatus]:
        """Every live executor's last heartbeat (a tenant's key or the admin key, like
        :meth:`stats`)."""
        return await self._session.run(self._calls.cluster_status(timeout_s))

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
        self,
        config_json: bytes,
        weights: bytes,
        name: str,
        *,
        timeout_s: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        hyperparams: Mapping[str, Any] | None = None,
        dataset_digest: str = "",
        activate: bool = True,
    ) -> AdapterInfo:
        """Like :meth:`push_adapter`, from the bytes of ``adapter_config.json`` and
        ``adapter_model.safetensors`` (for callers that hold them in memory, like the bridge);
        the metadata as in :meth:`push_adapter_tensors`."""
        meta = AdapterMetadata(activate, dataset_digest, hyperparams, metrics)
        call = self._calls.push_adapter(config_json, weights, name, timeout_s, meta)
        check_upload_size(config_json, weights, await self._upload_limit(call.timeout_s))
        return await self._session.run(call)

    async def _upload_limit(self, timeout_s: float) -> int:
        """The gateway's upload limit (asked once per client; 0 if it does not say)."""
        if self._max_upload_bytes is None:
            self._max_upload_bytes = await self._session.run(self._calls.upload_limit(timeout_s))
        return self._max_upload_bytes

    async def push_adapter_tensors(
        self,
        name: str,
        tensors: Mapping[str, Any],
        lora_config: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        hyperparams: Mapping[str, Any] | None = None,
        dataset_digest: str = "",
        activate: bool = True,
        timeout_s: float | None = None,
    ) -> AdapterInfo:
        """Push an adapter held in memory (a training loop outside Vajra) as the next version.

        ``tensors``: PEFT state-dict names to torch tensors or numpy arrays; ``lora_config``:
        the PEFT ``adapter_config.json`` as a mapping. Serialised here as safetensors, then
        validated by the gateway exactly as a directory push, and swapped in the same warm way
        (``activate=False``: staged, reachable as ``NAME@VERSION`` only). ``metrics``,
        ``hyperparams`` and ``dataset_digest`` are recorded with the version. InvalidRequest
        naming the problem when refused; nothing is stored then.
        """
        config_json, weights = await trio.to_thread.run_sync(
            adapter_bytes_from_tensors, tensors, lora_config
        )
        return await self.push_adapter_bytes(
            config_json,
            weights,
            name,
            timeout_s=timeout_s,
            metrics=metrics,
            hyperparams=hyperparams,
            dataset_digest=dataset_digest,
            activate=activate,
        )

    async def versions(self, name: str, *, timeout_s: float | None = None) -> list[AdapterInfo]:
        """Every version of ``name``, oldest first: digest, parent, created, metrics, and which
        is active. NotFoundError when this tenant has no such adapter."""
        return await self._session.run(self._calls.versions(name, timeout_s))

    async def rollback(
        self, name: str, version: int, *, timeout_s: float | None = None
    ) -> AdapterInfo:
        """Make ``version`` of ``name`` active again, the warm way (docs/hot-swap.md); returns
        it. NotFoundError when there is no such version; requests already running finish on
        the version they started with."""
        return await self._session.run(self._calls.rollback(name, version, timeout_s))

    async def merge(
        self,
        name: str,
        versions: tuple[int, int],
        weights: tuple[float, float] = (0.5, 0.5),
        *,
        activate: bool = True,
        timeout_s: float | None = None,
    ) -> AdapterInfo:
        """Register the exact weighted sum of two versions of ``name`` as its next version
        (rank r1 + r2; :mod:`vajra.adapters.merge`), active the warm way unless ``activate``
        is False. InvalidRequest (field ``versions``) for versions that cannot be merged:
        other modules, rank or alpha patterns, a sum over ``adapters.max_rank``."""
        return await self._session.run(
            self._calls.merge(name, versions, weights, activate, timeout_s)
        )

    async def list_adapters(self, *, timeout_s: float | None = None) -> list[AdapterInfo]:
        """Every version of every adapter of this key's tenant, by name then version."""
        return await self._session.run(self._calls.list_adapters(timeout_s))

    async def delete_adapter(
        self, name: str, version: int | None = None, *, timeout_s: float | None = None
    ) -> list[AdapterInfo]:
        """Delete one version (``version``, or ``name`` as ``NAME@VERSION``) or the whole name.

        Returns the deleted versions; NotFoundError if there is no such adapter or version.
        """
        return await self._session.run(self._calls.delete_adapter(name, version, timeout_s))

    # --- administration (this client's API key must be the cluster's admin key) -------------

    async def create_tenant(self, name: str, *, timeout_s: float | None = None) -> IssuedKey:
        """Admin: create a tenant and its first API key."""
        return await self._session.run(self._calls.create_tenant(name, timeout_s))

    async def create_api_key(self, tenant: str, *, timeout_s: float | None = None) -> IssuedKey:
        """Admin: issue another API key for ``tenant`` (a name or id)."""
        return await self._session.run(self._calls.create_api_key(tenant, timeout_s))

    async def revoke_api_key(self, api_key: str, *, timeout_s: float | None = None) -> None:
        """Admin: revoke ``api_key``; the gateway refuses it from its next request on."""
        await self._session.run(self._calls.revoke_api_key(api_key, timeout_s))

    async def delete_tenant(self, tenant: str, *, timeout_s: float | None = None) -> None:
        """Admin: delete ``tenant`` (a name or id) and all its keys."""
        await self._session.run(self._calls.delete_tenant(tenant, timeout_s))
