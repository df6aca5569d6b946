"""The executor's usage journal: every usage event on disk before it is sent, until acknowledged.

Data flows left to right::

    outbox ─append(event)──────▶ segment file (one JSON line each) ─fsync (batched)─▶ disk
    outbox ─progress(counts)───▶ segment file (one line per loop pass: streams so far)
    outbox ─ack(ids)───────────▶ segment file (one line per UsageAck)

The journal of executor ``E`` lives in one directory; each incarnation writes its own segment
files, ``usage-{incarnation}-{seq}.jsonl``. A line is one ``os.write`` of ``{"e": event}``,
a progress line or ``{"a": [event ids]}``, so an event the executor has recorded survives a
kill -9 of the process at any point (the kernel holds the write); :meth:`UsageJournal.sync`
(fsync, batched by the caller) makes it survive a machine crash too.

Progress: what requests still running have computed so far, written before the tokens it
counts are sent to a client. A request's first record is its whole event (``s``); later ones
are only its id and counts (``p``: GPU ms and tokens, cumulative, so only the largest record
of an id matters), which keeps a line per loop pass short. A request that ends writes its
event (``e``), which supersedes its progress. A request whose executor dies first has only
progress: recovery turns its largest progress record into its event, so a stream cut short by
a kill -9 is billed for what it computed up to the last chunk it was sent.

On start (:meth:`UsageJournal.recover`) the events of every earlier segment that no segment
acknowledges (progress turned into events included) are copied into the new incarnation's
segment (fsync'd), then the earlier segments are deleted: a crash during recovery leaves both,
and the next recovery reads both (events are keyed by id, so a copy counts once).
:meth:`UsageJournal.rotate` does the same within one incarnation (carrying the progress of the
requests still running), so a long-running executor's journal stays the size of its
unacknowledged events. With ``keep=True`` finished segments are renamed ``*.jsonl.done``
instead of deleted (an audit trail: every event the executor recorded; tests count them).

A last line torn by a crash (no newline, or not JSON) is skipped and counted: it was never
sent, since an event is sent only after its line was written whole. Errors: OSError from the
file system propagates to the caller (the executor cannot bill without its journal).
Thread-safety: :meth:`append` and :meth:`ack` may run on the event loop while :meth:`sync`
runs in a worker thread; :meth:`rotate` and :meth:`recover` hold a lock against both.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from vajra.bus.messages import UsageEvent

log = logging.getLogger("vajra.executor")

SUFFIX = ".jsonl"
DONE_SUFFIX = ".jsonl.done"


#: One running request's progress: (event id, GPU ms, prompt tokens, completion tokens), each
#: cumulative.
Progress = tuple[str, float, int, int]


class _Line(msgspec.Struct, omit_defaults=True):
    e: UsageEvent | None = None
    # A progress line: ``s``, the requests recorded for the first time (whole events, with
    # their counts then); ``p``, the counts of others; ``t``, when (Unix ms).
    s: list[UsageEvent] | None = None
    p: list[Progress] | None = None
    t: int = 0
    a: list[str] | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Line)


@dataclass
class SegmentContents:
    """What journal segments hold: events by id (first copy wins), the progress of requests
    that were running (their first record, and their largest counts), acknowledged ids, and
    the lines that could not be read (a torn last line)."""

    events: dict[str, UsageEvent] = field(default_factory=dict)
    started: dict[str, UsageEvent] = field(default_factory=dict)
    # event id -> (completion tokens, GPU ms, prompt tokens, when): the largest record.
    counts: dict[str, tuple[int, float, int, int]] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    bad_lines: int = 0

    def add_progress(self, started: list[UsageEvent], counts: list[Progress], ts: int) -> None:
        """Keep one progress line (records are cumulative, and segments may be read in any
        order, so the largest counts of an id win)."""
        for event in started:
            self.started.setdefault(event.event_id, event)
            self._count(
                event.event_id,
                (event.completion_tokens, event.gpu_ms, event.prompt_tokens, event.ts_unix_ms),
            )
        for event_id, gpu_ms, prompt, completion in counts:
            self._count(event_id, (completion, gpu_ms, prompt, ts))

    def _count(self, event_id: str, amount: tuple[int, float, int, int]) -> None:
        seen = self.counts.get(event_id)
        if seen is None or amount[:2] > seen[:2]:
            self.counts[event_id] = amount

    def progress_of(self, event_id: str) -> UsageEvent | None:
        """The request's largest progress record, as the event it would bill (None: none)."""
        start, amount = self.started.get(event_id), self.counts.get(event_id)
        if start is None or amount is None:
            return None
        completion, gpu_ms, prompt, ts = amount
        return msgspec.structs.replace(
            start,
            gpu_ms=gpu_ms,
            prompt_tokens=prompt,
            completion_tokens=completion,
            ts_unix_ms=ts,
        )

    def cut_short(self) -> list[UsageEvent]:
        """Requests that have progress but no event (their executor died while they ran),
        as events of what they computed; ones that computed nothing are left out."""
        out = []
        for event_id in self.started:
            if event_id not in self.events:
                event = self.progress_of(event_id)
                if event is not None and (event.gpu_ms > 0 or event.completion_tokens > 0):
                    out.append(event)
        return out

    def unacked(self) -> list[UsageEvent]:
        """Events no segment acknowledges, those cut short included, oldest first."""
        every = [*self.events.values(), *self.cut_short()]
        left = [e for e in every if e.event_id not in self.acked]
        return sorted(left, key=lambda e: e.ts_unix_ms)


def read_segments(paths: Iterable[Path], into: SegmentContents | None = None) -> SegmentContents:
    """Read segment files (missing ones are skipped) into one :class:`SegmentContents`."""
    out = into if into is not None else SegmentContents()
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        *whole, last = data.split(b"\n")
        if last:  # no newline after it: torn by a crash, never sent
            out.bad_lines += 1
        for raw in whole:
            if not raw:
                continue
            try:
                line = _decoder.decode(raw)
            except msgspec.DecodeError:
                out.bad_lines += 1
                continue
            if line.e is not None:
                out.events.setdefault(line.e.event_id, line.e)
            if line.s is not None or line.p is not None:
                out.add_progress(line.s or [], line.p or [], line.t)
            if line.a is not None:
                out.acked.update(line.a)
    return out


def segments(directory: Path, *, include_done: bool = False) -> list[Path]:
    """The segment files in ``directory`` (live ones; with ``include_done`` the kept ones too)."""
    if not directory.is_dir():
        return []
    live = sorted(directory.glob(f"usage-*{SUFFIX}"))
    if include_done:
        live += sorted(directory.glob(f"usage-*{DONE_SUFFIX}"))
    return live


class UsageJournal:
    """One incarnation's side of an executor's usage journal (module docstring). No I/O until
    :meth:`open`."""

    def __init__(self, directory: Path, incarnation: str, *, keep: bool = False) -> None:
        self.directory = directory
        self.incarnation = incarnation
        self.keep = keep
        self.lines = 0  # lines in the current segment
        self.bytes = 0  # bytes in the current segment
        self.bad_lines = 0  # torn or unreadable lines met by recovery
        self._seq = 0
        self._fd = -1
        self._path: Path | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> Path | None:
        return self._path

    def open(self) -> None:
        """Create the directory and this incarnation's first segment."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd, self._path = self._new_segment()

    def _new_segment(self) -> tuple[int, Path]:
        self._seq += 1
        path = self.directory / f"usage-{self.incarnation}-{self._seq:06d}{SUFFIX}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return fd, path

    def append(self, events: Iterable[UsageEvent]) -> None:
        """Write ``events`` (one line each, one write for all) before they are sent."""
        data = b"".join(_encoder.encode(_Line(e=e)) + b"\n" for e in events)
        if data:
            self._write(data, data.count(b"\n"))

    def progress(self, started: list[UsageEvent], counts: list[Progress], ts: int) -> None:
        """Write what running requests computed so far (one line), before it is sent:
        ``started``, requests recorded for the first time, as whole events; ``counts``, the
        others'; ``ts``, now (Unix ms)."""
        if started or counts:
            line = _Line(s=started or None, p=counts or None, t=ts)
            self._write(_encoder.encode(line) + b"\n", 1)

    def ack(self, event_ids: list[str]) -> None:
        """Record that the ledger acknowledged ``event_ids`` (not fsync'd: a lost ack line
        only makes the event be sent again, and the ledger counts it once)."""
        if event_ids and self._fd >= 0:  # acks arriving after close: resent, counted once
            self._write(_encoder.encode(_Line(a=event_ids)) + b"\n", 1)

    def _write(self, data: bytes, lines: int) -> None:
        with self._lock:
            if self._fd < 0:
                raise OSError("the usage journal is closed")
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self.lines += lines
            self.bytes += len(data)

    def sync(self) -> None:
        """fsync what was written so far (call it from a worker thread; batches of appends)."""
        with self._lock:
            if self._fd < 0:
                return
            fd = os.dup(self._fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def recover(self) -> list[UsageEvent]:
        """Take over the unacknowledged events of every other segment in the directory: copy
        them into this incarnation's segment (fsync'd), then retire the other segments.
        Returns those events (to be sent again)."""
        with self._lock:
            others = [p for p in segments(self.directory) if p != self._path]
            if not others:
                return []
            contents = read_segments(others)
            self.bad_lines += contents.bad_lines
            events = contents.unacked()
        if contents.bad_lines:
            log.warning("usage journal: skipped %d torn or unreadable lines", contents.bad_lines)
        self.append(events)
        self.sync()
        with self._lock:
            for path in others:
                self._retire(path)
            _fsync_dir(self.directory)
        return events

    def rotate(self, pending: Iterable[UsageEvent], running: list[UsageEvent]) -> None:
        """Start a new segment holding only ``pending`` (the unacknowledged events) and the
        progress of ``running`` requests (events with their latest counts), fsync it, then
        retire the old one. Hold no other call to this journal meanwhile."""
        with self._lock:
            old_fd, old_path = self._fd, self._path
            self._fd, self._path = self._new_segment()
            self.lines = self.bytes = 0
        self.append(pending)
        self.progress(running, [], max((e.ts_unix_ms for e in running), default=0))
        self.sync()
        with self._lock:
            os.close(old_fd)
            if old_path is not None:
                self._retire(old_path)
            _fsync_dir(self.directory)

    def _retire(self, path: Path) -> None:
        try:
            if self.keep:
                path.rename(path.with_name(path.name[: -len(SUFFIX)] + DONE_SUFFIX))
            else:
                path.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """fsync and close the current segment (it stays for the next incarnation)."""
        if self._fd < 0:
            return
        self.sync()
        with self._lock:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
