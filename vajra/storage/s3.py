"""S3 through aiobotocore, run on one asyncio event loop in a dedicated worker thread.

Data flows left to right::

    Trio task ──coroutine──▶ asyncio loop thread (aiobotocore) ──HTTP──▶ S3
    Trio task ◀──TrioToken.run_sync_soon(wake)── concurrent Future done ◀──┘

The Trio side never blocks: it submits the coroutine with
``asyncio.run_coroutine_threadsafe`` and sleeps until the future's done-callback wakes it
through the Trio token. Cancelling the Trio call cancels the coroutine. The blocking API
(for the CLI and threads) waits on the same future. One aiobotocore client (one connection
pool) serves every call; the thread and client start on first use and stop in :meth:`close`.

Timeouts: ``connect_timeout_s`` and ``read_timeout_s`` per HTTP attempt, at most
``max_attempts`` attempts, and ``op_timeout_s`` for the whole operation. A server that is
down, refuses connections or does not answer in time raises
:class:`~vajra.errors.UnavailableError`; a missing key :class:`~vajra.errors.NotFoundError`;
refused credentials and other S3 errors :class:`~vajra.errors.InternalError`.

The bucket is created on first use if it does not exist.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import trio

from vajra.errors import InternalError, NotFoundError, UnavailableError, VajraError
from vajra.storage.base import ObjectStore, check_key, check_prefix, too_large

log = logging.getLogger("vajra.storage")

T = TypeVar("T")

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_UNAVAILABLE_CODES = frozenset(
    {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown"}
)


def _translate(exc: BaseException, what: str, endpoint: str) -> VajraError:
    """A Vajra error for whatever aiobotocore (or the loop) raised."""
    import aiohttp
    import botocore.exceptions as bexc  # type: ignore[import-untyped]

    if isinstance(exc, VajraError):
        return exc
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return UnavailableError(f"S3 at {endpoint} did not answer {what} in time")
    if isinstance(
        exc,
        bexc.EndpointConnectionError
        | bexc.ConnectTimeoutError
        | bexc.ReadTimeoutError
        | bexc.ConnectionClosedError
        | bexc.HTTPClientError
        | aiohttp.ClientError
        | ConnectionError,
    ):
        return UnavailableError(f"S3 at {endpoint} is unreachable ({what}): {exc}")
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return InternalError(
            f"no S3 credentials: set storage.s3_access_key_id / s3_secret_access_key "
            f"or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ({exc})"
        )
    if isinstance(exc, bexc.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _NOT_FOUND_CODES:
            return NotFoundError(f"{what}: not found", field="key")
        if code in _UNAVAILABLE_CODES or (isinstance(status, int) and status >= 500):
            return UnavailableError(f"S3 at {endpoint} failed {what}: {code} {err.get('Message')}")
        return InternalError(f"S3 at {endpoint} refused {what}: {code} {err.get('Message')}")
    if isinstance(exc, bexc.BotoCoreError):
        return InternalError(f"S3 at {endpoint} failed {what}: {exc}")
    return InternalError(f"S3 at {endpoint} failed {what}: {type(exc).__name__}: {exc}")


class S3ObjectStore(ObjectStore):
    """See the module docstring. Construct with the connection settings; no I/O until used."""

    kind = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        endpoint: str = "",
        region: str = "us-east-1",
        access_key_id: str = "",
        secret_access_key: str = "",
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 10.0,
        op_timeout_s: float = 60.0,
        max_attempts: int = 2,
        create_bucket: bool = True,
    ) -> None:
        self.bucket = bucket
        self.endpoint = endpoint
        self.region = region
        self._access_key_id = access_key_id or None
        self._secret_access_key = secret_access_key or None
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._op_timeout_s = op_timeout_s
        self._max_attempts = max(1, max_attempts)
        self._create_bucket = create_bucket
        self._lock = threading.Lock()  # guards the loop thread's start and stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Owned by the loop thread:
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._bucket_ready = False
        self._client_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        return f"<S3ObjectStore {self.endpoint or 'aws'}/{self.bucket}>"

    @property
    def _where(self) -> str:
        return self.endpoint or f"aws:{self.region}"

    # --- the loop thread -----------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None:
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()
                loop.close()

            thread = threading.Thread(target=main, name="vajra-s3-loop", daemon=True)
            thread.start()
            ready.wait()
            self._loop, self._thread = loop, thread
            return loop

    async def _get_client(self) -> Any:
        """The aiobotocore client, created (and the bucket ensured) on first use. Loop thread."""
        if self._client_lock is None:
            self._client_lock = asyncio.Lock()
        async with self._client_lock:
            if self._client is None:
                from aiobotocore.config import AioConfig
                from aiobotocore.session import get_session

                config = AioConfig(
                    connect_timeout=self._connect_timeout_s,
                    read_timeout=self._read_timeout_s,
                    retries={"total_max_attempts": self._max_attempts, "mode": "standard"},
                    s3={"addressing_style": "path"},
                )
                stack = contextlib.AsyncExitStack()
                self._client = await stack.enter_async_context(
                    get_session().create_client(
                        "s3",
                        endpoint_url=self.endpoint or None,
                        region_name=self.region,
                        aws_access_key_id=self._access_key_id,
                        aws_secret_access_key=self._secret_access_key,
                        config=config,
                    )
                )
                self._stack = stack
            if not self._bucket_ready:
                await self._ensure_bucket(self._client)
                self._bucket_ready = True
            return self._client

    async def _ensure_bucket(self, client: Any) -> None:
        import botocore.exceptions as bexc  # type: ignore[import-untyped]

        try:
            await client.head_bucket(Bucket=self.bucket)
            return
        except bexc.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchBucket", "NotFound") or not self._create_bucket:
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            await client.create_bucket(**kwargs)
            log.info("created S3 bucket %s at %s", self.bucket, self._where)
        except bexc.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    async def _op(self, what: str, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Run one operation on the loop thread under the whole-operation timeout."""

        async def body() -> T:
            return await fn(await self._get_client())

        try:
            return await asyncio.wait_for(body(), self._op_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _translate(exc, what, self._where) from exc

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._ensure_loop())

    def _blocking(self, coro: Coroutine[Any, Any, T]) -> T:
        fut = self._submit(coro)
        try:
            return fut.result(timeout=self._op_timeout_s + 5.0)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise UnavailableError(f"S3 at {self._where} did not answer in time") from None

    async def _trio(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` (run on the loop thread) from Trio without blocking the Trio loop."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        fut = self._submit(coro)
        fut.add_done_callback(wake)
        try:
            await done.wait()
        finally:
            if not fut.done():
                fut.cancel()  # cancelled here: cancel the coroutine on the loop thread too
        return fut.result()

    # --- operations (coroutines on the loop thread) ------------------------------------------

    async def _put(self, key: str, data: bytes) -> None:
        async def run(c: Any) -> None:
            await c.put_object(Bucket=self.bucket, Key=key, Body=data)

        await self._op(f"put {key!r}", run)

    async def _get(self, key: str, max_bytes: int | None = None) -> bytes:
        async def run(c: Any) -> bytes:
            resp = await c.get_object(Bucket=self.bucket, Key=key)
            async with resp["Body"] as body:
                if max_bytes is None:
                    data: bytes = await body.read()
                    return data
                size = int(resp.get("ContentLength") or 0)
                if size > max_bytes:  # refused before reading: the body is dropped unread
                    raise too_large(key, size, max_bytes)
                parts: list[bytes] = []
                total = 0
                while total <= max_bytes:  # a read may return less than asked: until EOF
                    part = await body.read(max_bytes + 1 - total)
                    if not part:
                        break
                    parts.append(part)
                    total += len(part)
                if total > max_bytes:  # it was larger than its ContentLength said
                    raise too_large(key, total, max_bytes)
            return b"".join(parts)

        try:
            return await self._op(f"get {key!r}", run)
        except NotFoundError:
            raise NotFoundError(f"object {key!r} not found", field="key") from None

    async def _delete(self, key: str) -> None:
        async def run(c: Any) -> None:
            await c.delete_object(Bucket=self.bucket, Key=key)

        await self._op(f"delete {key!r}", run)

    async def _exists(self, key: str) -> bool:
        async def run(c: Any) -> bool:
            await c.head_object(Bucket=self.bucket, Key=key)
            return True

        try:
            return await self._op(f"head {key!r}", run)
        except NotFoundError:
            return False

    async def _list(self, prefix: str) -> list[str]:
        async def run(c: Any) -> list[str]:
            out: list[str] = []
            paginator = c.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                out.extend(obj["Key"] for obj in page.get("Contents", []))
            return sorted(out)

        return await self._op(f"list {prefix!r}", run)

    # --- blocking API ----------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        self._blocking(self._put(check_key(key), bytes(data)))

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        return self._blocking(self._get(check_key(key), max_bytes))

    def delete(self, key: str) -> None:
        self._blocking(self._delete(check_key(key)))

    def exists(self, key: str) -> bool:
        return self._blocking(self._exists(check_key(key)))

    def list_keys(self, prefix: str = "") -> list[str]:
        return self._blocking(self._list(check_prefix(prefix)))

    # --- Trio API --------------------------------------------------------------------------

    async def aput(self, key: str, data: bytes) -> None:
        await self._trio(self._put(check_key(key), bytes(data)))

    async def aget(self, key: str, *, max_bytes: int | None = None) -> bytes:
        return await self._trio(self._get(check_key(key), max_bytes))

    async def adelete(self, key: str) -> None:
        await self._trio(self._delete(check_key(key)))

    async def aexists(self, key: str) -> bool:
        return await self._trio(self._exists(check_key(key)))

    async def alist_keys(self, prefix: str = "") -> list[str]:
        return await self._trio(self._list(check_prefix(prefix)))

    # --- lifecycle -------------------------------------------------------------------------

    async def _aclose_client(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        self._bucket_ready = False
        self._client_lock = None
        if stack is not None:
            await stack.aclose()

    def close(self) -> None:
        """Close the client and stop the loop thread (bounded); later calls start them again."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._aclose_client(), loop).result(timeout=5.0)
        except Exception as exc:  # closing is best effort
            log.debug("closing the S3 client failed: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
