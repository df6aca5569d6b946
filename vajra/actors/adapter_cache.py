"""The executor's two memory-side adapter caches: pinned host slots and the local disk.

Both are owned by the executor's Trio thread: every table, free list and byte count below is
read and written only there. Worker threads get pure work on memory or paths the owner chose
for them (read these files, write those, delete those victims) and never touch the tables, so
no lock is needed and no two threads can hand out the same slot or count the same bytes.

* :class:`HostSlab` — one buffer allocated at start, cut into fixed slots per size class (a
  packed adapter's size follows its rank and the module kinds it targets). A slot is
  *reserved* (being packed), *cached* (listed by digest) or free. A cached slot that a
  copy to the GPU may still read is *busy* (pinned by the loader, or its asynchronous CUDA copy
  has not finished) and is never evicted or handed out again; dropping a busy slot only
  unlists it, and its memory is reused once the copy is done.
* :class:`DiskCache` — adapter files under ``<root>/<digest>/``, bounded in bytes, LRU. A
  failing disk (a full one, an I/O error) loses the cache, never a request: failures are
  logged, counted in ``stats.errors`` and answered as a miss.

Which entry leaves either cache is :mod:`vajra.policies.eviction`'s choice. Also here, for
every tier: an adapter's digest (:func:`digest_of`) and the typed error a failed load becomes
(:func:`typed_load_error`).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio

from vajra.adapters.format import InvalidAdapter
from vajra.errors import InternalError, OverloadedError, UnavailableError, VajraError
from vajra.gpu.lora import HostAdapter
from vajra.policies.eviction import lru_victim, victims_to_fit
from vajra.storage.adapters import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

log = logging.getLogger("vajra.executor.tiers")

#: Upper bounds (ms) of the load-time histogram buckets.
LOAD_MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    errors: int = 0  # failures the tier absorbed (a disk write or read that failed)
    load_ms: Counter[float] = field(default_factory=Counter)  # bucket upper bound -> count
    load_ms_sum: float = 0.0

    def observe(self, ms: float) -> None:
        self.load_ms[next(b for b in LOAD_MS_BUCKETS if ms <= b)] += 1
        self.load_ms_sum += ms


@dataclass(eq=False)
class HostEntry:
    """One host slot and what it holds."""

    digest: str
    c: int  # size class
    local: int  # slot inside the class
    buffer: torch.Tensor  # the slot's memory, [class_numel]
    host: HostAdapter | None = None  # set once packed and cached
    pins: int = 0  # loads that will copy out of the buffer
    copy: Any = None  # torch.cuda.Event of the last copy out of the buffer, until it is done

    def busy(self) -> bool:
        """Whether a copy to the GPU may still read the buffer."""
        if self.copy is not None and self.copy.query():
            self.copy = None
        return self.pins > 0 or self.copy is not None


class HostSlab:
    """Host memory for packed adapters, allocated once and cut into fixed slots per size class.

    ``class_numels`` are the slot sizes in elements (the executor's tiers size them as
    adapters of a few ranks on every module kind; one on fewer kinds packs smaller). A cached
    adapter takes a slot of the smallest class that fits, free or else holding the
    least-recently-used idle entry of that class. Nothing is allocated (or pinned) after start.
    """

    def __init__(
        self,
        class_numels: Sequence[int],
        capacity_bytes: int,
        dtype: torch.dtype,
        stats: TierStats | None = None,
    ) -> None:
        element = torch.empty((), dtype=dtype).element_size()
        numels = sorted(set(class_numels))
        per_class = capacity_bytes // max(1, len(numels))
        self.classes: list[tuple[int, torch.Tensor]] = []  # (slot numel, [slots, numel])
        pin = torch.cuda.is_available()
        for numel in numels:
            slots = max(1, per_class // (numel * element))
            buf = torch.empty((slots, numel), dtype=dtype, pin_memory=pin)
            self.classes.append((numel, buf))
        self.entries: OrderedDict[str, HostEntry] = OrderedDict()  # cached, least recent first
        self._free: list[list[int]] = [list(range(buf.shape[0])) for _, buf in self.classes]
        self._retired: list[HostEntry] = []  # unlisted while busy; freed once idle
        self.capacity_bytes = sum(b.numel() * b.element_size() for _, b in self.classes)
        self.stats = stats or TierStats()

    def get(self, digest: str) -> HostEntry | None:
        entry = self.entries.get(digest)
        if entry is not None:
            self.entries.move_to_end(digest)
        return entry

    def reserve(self, digest: str, numel: int) -> HostEntry | None:
        """A slot for an adapter packed into ``numel`` elements, or None while every slot
        that fits is busy.

        Takes a free slot, else evicts the least-recently-used idle entry of a fitting class.
        Raises InvalidAdapter only when ``numel`` exceeds every class.
        """
        if numel > self.classes[-1][0]:
            raise InvalidAdapter(
                f"the packed adapter ({numel} elements) exceeds the largest host slot "
                f"({self.classes[-1][0]})"
            )
        self._sweep()
        for c, (class_numel, buf) in enumerate(self.classes):
            if class_numel < numel:
                continue
            if not self._free[c]:
                of_class = (d for d, e in self.entries.items() if e.c == c)
                victim = lru_victim(of_class, self._busy)
                if victim is None:
                    continue
                self.drop(victim)
                self.stats.evictions += 1
            local = self._free[c].pop()
            return HostEntry(digest, c, local, buf[local])
        return None

    def _busy(self, digest: str) -> bool:
        return self.entries[digest].busy()

    def put(self, entry: HostEntry, host: HostAdapter) -> None:
        """List a reserved slot, now packed, under its digest."""
        entry.host = host
        old = self.entries.pop(entry.digest, None)
        if old is not None:
            self._retire(old)
        self.entries[entry.digest] = entry

    def cancel(self, entry: HostEntry) -> None:
        """Give back a reserved slot whose packing failed."""
        self._free[entry.c].append(entry.local)

    def pin(self, entry: HostEntry) -> None:
        entry.pins += 1

    def unpin(self, entry: HostEntry, copy: Any = None) -> None:
        """One copy out of ``entry`` was issued; ``copy`` is its CUDA event (None: done)."""
        entry.pins -= 1
        if copy is not None:
            entry.copy = copy
        self._sweep()

    def drop(self, digest: str) -> bool:
        entry = self.entries.pop(digest, None)
        if entry is None:
            return False
        self._retire(entry)
        return True

    def _retire(self, entry: HostEntry) -> None:
        entry.host = None
        self._retired.append(entry)
        self._sweep()

    def _sweep(self) -> None:
        if not self._retired:
            return
        keep = []
        for entry in self._retired:
            if entry.busy():
                keep.append(entry)
            else:
                self._free[entry.c].append(entry.local)
        self._retired = keep


class DiskCache:
    """The local-disk tier: adapter files by digest, bounded in bytes, least-recently-used out.

    :meth:`read` and :meth:`write` run the file work in worker threads under ``io`` and never
    raise for a disk failure (see the module docstring).
    """

    def __init__(
        self,
        root: Path,
        capacity_bytes: int,
        *,
        io: trio.CapacityLimiter,
        stats: TierStats | None = None,
    ) -> None:
        self.root = root
        self.capacity_bytes = capacity_bytes
        self.stats = stats or TierStats()
        self._io = io
        root.mkdir(parents=True, exist_ok=True)
        self.entries: OrderedDict[str, int] = OrderedDict()  # digest -> bytes, least recent first
        self._busy: set[str] = set()  # being written, or being deleted as a victim
        self._doomed: set[str] = set()  # forgotten while busy: not to be listed once written
        found = []
        for d in root.iterdir():
            weights = d / ADAPTER_WEIGHTS_FILE
            config = d / ADAPTER_CONFIG_FILE
            if d.is_dir() and weights.exists() and config.exists():
                found.append(
                    (
                        weights.stat().st_mtime,
                        d.name,
                        weights.stat().st_size + config.stat().st_size,
                    )
                )
        for _, digest, size in sorted(found):
            self.entries[digest] = size
        self.used_bytes = sum(self.entries.values())

    def __contains__(self, digest: str) -> bool:
        return digest in self.entries

    async def read(self, digest: str) -> tuple[bytes, bytes] | None:
        """The adapter's (config, weights), or None: not cached, or the read failed."""
        if digest not in self.entries:
            return None
        self.entries.move_to_end(digest)
        try:
            return await trio.to_thread.run_sync(_read_files, self.root / digest, limiter=self._io)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                self.stats.errors += 1
                log.warning("disk cache: reading adapter %s failed: %s", digest[:12], exc)
            self._unlist(digest)
            return None

    async def write(self, digest: str, config: bytes, weights: bytes) -> bool:
        """Cache the adapter's files (evicting LRU to fit); False when not cached."""
        size = len(config) + len(weights)
        if size > self.capacity_bytes or digest in self.entries or digest in self._busy:
            return False
        victims = victims_to_fit(self.entries.items(), self.used_bytes, self.capacity_bytes, size)
        for victim in victims:
            self.used_bytes -= self.entries.pop(victim)
            self.stats.evictions += 1
        self.used_bytes += size  # reserved now, so concurrent writes never overshoot
        busy = {digest, *victims}
        self._busy |= busy
        try:
            await trio.to_thread.run_sync(
                _write_files, self.root, digest, config, weights, victims, limiter=self._io
            )
        except OSError as exc:
            self.used_bytes -= size
            self.stats.errors += 1
            log.warning("disk cache: writing adapter %s failed: %s", digest[:12], exc)
            return False
        finally:
            self._busy -= busy
            self._doomed -= set(victims)  # deleted anyway
        if digest in self._doomed:  # forgotten while it was written
            self._doomed.discard(digest)
            self.used_bytes -= size
            await trio.to_thread.run_sync(_remove, self.root / digest, limiter=self._io)
            return False
        self.entries[digest] = size
        return True

    def forget(self, digest: str) -> None:
        """Unlist ``digest`` and delete its files (two files, on the calling thread); one
        being written or deleted right now is deleted when that ends."""
        self._unlist(digest)
        if digest in self._busy:
            self._doomed.add(digest)
            return
        _remove(self.root / digest)

    def _unlist(self, digest: str) -> None:
        size = self.entries.pop(digest, None)
        if size is not None:
            self.used_bytes -= size


def _read_files(directory: Path) -> tuple[bytes, bytes]:
    return (directory / ADAPTER_CONFIG_FILE).read_bytes(), (
        directory / ADAPTER_WEIGHTS_FILE
    ).read_bytes()


def _write_files(
    root: Path, digest: str, config: bytes, weights: bytes, victims: list[str]
) -> None:
    """Delete the victims' directories, then write ``<root>/<digest>/`` atomically (rename)."""
    for victim in victims:
        shutil.rmtree(root / victim, ignore_errors=True)
    tmp = root / f".{digest}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        (tmp / ADAPTER_CONFIG_FILE).write_bytes(config)
        (tmp / ADAPTER_WEIGHTS_FILE).write_bytes(weights)
        final = root / digest
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def digest_of(config: bytes, weights: bytes) -> str:
    """An adapter's digest: sha256 over its config bytes, then its weights bytes."""
    h = hashlib.sha256()
    h.update(config)
    h.update(weights)
    return h.hexdigest()


def typed_load_error(exc: Exception, digest: str) -> VajraError:
    """The typed error a request gets for an unexpected failure while loading ``digest``."""
    what = f"loading adapter {digest[:12]} failed"
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        log.warning("%s: out of memory: %s", what, exc)
        return OverloadedError(f"{what}: out of memory; retry")
    if isinstance(exc, OSError):  # the message (paths) stays in the log, not in the answer
        log.warning("%s: %s", what, exc)
        return UnavailableError(f"{what}: {type(exc).__name__}; retry")
    log.error("%s", what, exc_info=exc)
    return InternalError(f"{what}: {type(exc).__name__}")
