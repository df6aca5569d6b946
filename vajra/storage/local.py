"""The embedded object store: one file per object under a root directory.

``put`` writes a temporary file in the target's directory, flushes and fsyncs it, then
renames it over the target, so readers never see a partial object and a crash leaves at
worst a stray ``.tmp-*`` file (never returned by :meth:`LocalObjectStore.list_keys`). The
Trio methods run the file I/O in worker threads (at most ``max_threads`` at once).
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import trio

from vajra.errors import InternalError, NotFoundError
from vajra.storage.base import ObjectStore, check_key, check_prefix, too_large

P = ParamSpec("P")
R = TypeVar("R")

_TMP_MARK = ".tmp-"


class LocalObjectStore(ObjectStore):
    kind = "local"

    def __init__(self, root: str | Path, *, max_threads: int = 4) -> None:
        self.root = Path(root).expanduser()
        self._limiter = trio.CapacityLimiter(max_threads)

    def __repr__(self) -> str:
        return f"<LocalObjectStore {self.root}>"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if _TMP_MARK in path.name:
            raise InternalError(f"object key {key!r} collides with temporary file names")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}{_TMP_MARK}{secrets.token_hex(6)}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            raise InternalError(f"cannot write object {key!r} under {self.root}: {exc}") from exc

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        try:
            with path.open("rb") as f:
                if max_bytes is None:
                    return f.read()
                size = os.fstat(f.fileno()).st_size
                data = f.read(max_bytes + 1) if size <= max_bytes else b""
                if size > max_bytes or len(data) > max_bytes:  # or it grew while read
                    raise too_large(key, max(size, len(data)), max_bytes)
                return data
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(f"object {key!r} not found", field="key") from None
        except OSError as exc:
            raise InternalError(f"cannot read object {key!r} under {self.root}: {exc}") from exc

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except (IsADirectoryError, NotADirectoryError):
            return
        except OSError as exc:
            raise InternalError(f"cannot delete object {key!r} under {self.root}: {exc}") from exc
        # Drop directories left empty, up to (not including) the root.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        prefix = check_prefix(prefix)
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if _TMP_MARK in name:
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    async def _thread(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self._limiter
        )

    async def aput(self, key: str, data: bytes) -> None:
        await self._thread(self.put, key, data)

    async def aget(self, key: str, *, max_bytes: int | None = None) -> bytes:
        return await self._thread(self.get, key, max_bytes=max_bytes)

    async def adelete(self, key: str) -> None:
        await self._thread(self.delete, key)

    async def aexists(self, key: str) -> bool:
        return await self._thread(self.exists, key)

    async def alist_keys(self, prefix: str = "") -> list[str]:
        return await self._thread(self.list_keys, prefix)
