"""The object-store interface shared by the local directory and S3 implementations.

Keys are ``/``-separated paths of ``[A-Za-z0-9_.-]`` segments (no empty, ``.`` or ``..``
segment), at most 512 characters; anything else raises :class:`~vajra.errors.InvalidRequest`
(field ``key``) before any I/O.

Every store has a blocking API (for the CLI and worker threads) and the same operations for
Trio code, prefixed ``a`` (``await store.aget(key)``), which never block the event loop.

Errors: a missing key raises :class:`~vajra.errors.NotFoundError` (from ``get``); a store
that cannot be reached, or does not answer in time, raises the retriable
:class:`~vajra.errors.UnavailableError`; anything else :class:`~vajra.errors.InternalError`.
``put`` is atomic: a reader sees the whole old object or the whole new one, never a part.
``delete`` of a missing key is not an error.
"""

from __future__ import annotations

import abc
import re
from types import TracebackType

from vajra.errors import InvalidRequest, PayloadTooLarge

_SEGMENT = re.compile(r"[A-Za-z0-9_.-]+")
MAX_KEY_CHARS = 512


def check_key(key: object) -> str:
    """``key`` if it is a valid object key; raises InvalidRequest (field ``key``) otherwise."""
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS:
        raise InvalidRequest(f"object key must be 1..{MAX_KEY_CHARS} characters", field="key")
    for seg in key.split("/"):
        if seg in ("", ".", "..") or not _SEGMENT.fullmatch(seg):
            raise InvalidRequest(
                f"object key {key!r} must be '/'-separated segments of [A-Za-z0-9_.-]",
                field="key",
            )
    return key


def check_prefix(prefix: object) -> str:
    """A key prefix for :meth:`ObjectStore.list_keys`: empty, or a valid key (optionally ``/``-terminated)."""
    if prefix == "":
        return ""
    if isinstance(prefix, str) and prefix.endswith("/"):
        check_key(prefix[:-1])
        return prefix
    return check_key(prefix)


class ObjectStore(abc.ABC):
    """A flat namespace of immutable-by-convention byte objects. See the module docstring."""

    #: "local" or "s3"
    kind: str = ""

    # --- blocking API ------------------------------------------------------------------

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing any object there, atomically."""

    @abc.abstractmethod
    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes; NotFoundError (field ``key``) if there is none. With
        ``max_bytes``, an object larger than that raises PayloadTooLarge (field ``key``)
        without being read whole: what a caller reading a key someone else chose passes."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abc.abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix``, sorted."""

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release connections and threads. Further calls may reopen them."""

    # --- Trio API ------------------------------------------------------------------------

    @abc.abstractmethod
    async def aput(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def aget(self, key: str, *, max_bytes: int | None = None) -> bytes: ...

    @abc.abstractmethod
    async def adelete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def aexists(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def alist_keys(self, prefix: str = "") -> list[str]: ...

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def too_large(key: str, size: int, max_bytes: int) -> PayloadTooLarge:
    """The error of an object over a reader's ``max_bytes``."""
    return PayloadTooLarge(
        f"object {key!r} is {size} bytes, over the limit of {max_bytes}", field="key"
    )
