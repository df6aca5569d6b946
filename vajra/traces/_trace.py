"""The columnar trace: one numpy array per field, sorted by arrival time.

A day of the Azure Functions trace is over ten million arrivals and a simulated day at scale
is tens of millions, so a :class:`Trace` never holds one Python object per arrival; iterating
it builds :class:`Arrival` values lazily, one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from vajra.errors import InvalidRequest

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]

# Tokens per request and arrivals per cell are stored as int32; anything above this is refused
# as input rather than silently wrapped.
MAX_INT32 = 2**31 - 1


class TraceError(InvalidRequest):
    """A trace file (or trace argument) that cannot be used.

    ``row`` is the 1-based line number in the file (the header is row 1) and ``column`` the
    header name of the offending field; either is ``None`` when the fault is not in one cell
    (an empty file, a missing companion file).
    """

    def __init__(self, message: str, *, row: int | None = None, column: str | None = None) -> None:
        where = []
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        full = f"{message} ({', '.join(where)})" if where else message
        super().__init__(full, field=column)
        self.row = row
        self.column = column


@dataclass(frozen=True, slots=True)
class Arrival:
    """One request of a trace: when, from which source, and how big."""

    t_ms: float
    function: str  # source id: function or app hash, or an adapter index as text
    prompt_tokens: int
    output_tokens: int
    duration_ms: float | None


class Trace:
    """Arrivals as parallel numpy arrays, sorted by ``t_ms`` (milliseconds from the trace start).

    ``source[i]`` indexes ``sources``; ``duration_ms`` (per arrival, NaN where unknown) and
    ``source_memory_mb`` (per source, NaN where unknown) are optional. The arrays are
    read-only views: derive a new trace instead of editing one.

    Raises :class:`TraceError` when the arrays disagree in length, are not sorted, or a
    source index points outside ``sources``.
    """

    __slots__ = (
        "duration_ms",
        "name",
        "output_tokens",
        "prompt_tokens",
        "source",
        "source_memory_mb",
        "sources",
        "t_ms",
    )

    def __init__(
        self,
        *,
        t_ms: npt.ArrayLike,
        source: npt.ArrayLike,
        prompt_tokens: npt.ArrayLike,
        output_tokens: npt.ArrayLike,
        sources: Sequence[str],
        name: str,
        duration_ms: npt.ArrayLike | None = None,
        source_memory_mb: npt.ArrayLike | None = None,
    ) -> None:
        self.t_ms: F64 = _frozen(np.asarray(t_ms, dtype=np.float64))
        self.source: I32 = _frozen(np.asarray(source, dtype=np.int32))
        self.prompt_tokens: I32 = _frozen(np.asarray(prompt_tokens, dtype=np.int32))
        self.output_tokens: I32 = _frozen(np.asarray(output_tokens, dtype=np.int32))
        self.sources: list[str] = list(sources)
        self.name = name
        self.duration_ms: F64 | None = (
            None if duration_ms is None else _frozen(np.asarray(duration_ms, dtype=np.float64))
        )
        self.source_memory_mb: F64 | None = (
            None
            if source_memory_mb is None
            else _frozen(np.asarray(source_memory_mb, dtype=np.float64))
        )
        self._validate()

    def _validate(self) -> None:
        n = self.t_ms.shape[0]
        for label, arr in (
            ("source", self.source),
            ("prompt_tokens", self.prompt_tokens),
            ("output_tokens", self.output_tokens),
            ("duration_ms", self.duration_ms),
        ):
            if arr is not None and (arr.ndim != 1 or arr.shape[0] != n):
                raise TraceError(f"{label} has {arr.shape} entries, t_ms has {n}", column=label)
        if self.t_ms.ndim != 1:
            raise TraceError("t_ms must be one-dimensional", column="t_ms")
        if n and not np.all(np.isfinite(self.t_ms)):
            raise TraceError("t_ms holds NaN or infinity", column="t_ms")
        if n > 1 and bool(np.any(np.diff(self.t_ms) < 0)):
            raise TraceError("t_ms is not sorted", column="t_ms")
        if n and (int(self.source.min()) < 0 or int(self.source.max()) >= len(self.sources)):
            raise TraceError("a source index is outside sources", column="source")
        if self.source_memory_mb is not None and self.source_memory_mb.shape != (
            len(self.sources),
        ):
            raise TraceError("source_memory_mb needs one entry per source", column="memory")

    def __len__(self) -> int:
        return int(self.t_ms.shape[0])

    def __iter__(self) -> Iterator[Arrival]:
        dur = self.duration_ms
        for i in range(len(self)):
            d = None if dur is None or np.isnan(dur[i]) else float(dur[i])
            yield Arrival(
                t_ms=float(self.t_ms[i]),
                function=self.sources[int(self.source[i])],
                prompt_tokens=int(self.prompt_tokens[i]),
                output_tokens=int(self.output_tokens[i]),
                duration_ms=d,
            )

    def __repr__(self) -> str:
        span = self.duration_s
        return (
            f"Trace({self.name!r}, {len(self)} arrivals, {len(self.sources)} sources, {span:.1f} s)"
        )

    @property
    def duration_s(self) -> float:
        """Time from the first to the last arrival, in seconds (0 for fewer than two)."""
        if len(self) < 2:
            return 0.0
        return float(self.t_ms[-1] - self.t_ms[0]) / 1000.0

    def take(
        self, index: npt.NDArray[np.intp] | npt.NDArray[np.bool_], *, name: str | None = None
    ) -> Trace:
        """The arrivals selected by ``index`` (a sorted index array or a boolean mask)."""
        return Trace(
            t_ms=self.t_ms[index],
            source=self.source[index],
            prompt_tokens=self.prompt_tokens[index],
            output_tokens=self.output_tokens[index],
            sources=self.sources,
            name=self.name if name is None else name,
            duration_ms=None if self.duration_ms is None else self.duration_ms[index],
            source_memory_mb=self.source_memory_mb,
        )

    def slice(self, start_ms: float, end_ms: float) -> Trace:
        """Arrivals with ``start_ms <= t_ms < end_ms``, times kept as they are."""
        lo = int(np.searchsorted(self.t_ms, start_ms, side="left"))
        hi = int(np.searchsorted(self.t_ms, end_ms, side="left"))
        return self.take(np.arange(lo, max(lo, hi)))

    def head(self, n: int) -> Trace:
        """The first ``n`` arrivals (all of them when ``n`` is larger than the trace)."""
        if n < 0:
            raise TraceError(f"head needs n >= 0, got {n}")
        return self.take(np.arange(min(n, len(self))))

    def rebased(self) -> Trace:
        """The same trace with its first arrival moved to t = 0."""
        if not len(self):
            return self
        out = self.take(np.arange(len(self)))
        out.t_ms = _frozen(self.t_ms - self.t_ms[0])
        return out

    def scaled(self, *, time: float = 1.0, rate: float = 1.0, seed: int = 0) -> Trace:
        """Stretch time and thin or thicken the arrivals.

        ``time`` multiplies every timestamp (and duration): 0.1 replays ten times faster.
        ``rate`` multiplies the number of arrivals while keeping the trace's shape in time:
        below 1 each arrival is kept with probability ``rate``; above 1 each arrival gets
        ``floor(rate)`` or ``floor(rate) + 1`` copies (mean ``rate``), the extra copies placed
        uniformly between it and the next arrival of the trace, with the same source and sizes.
        Seeded, so the same arguments give the same trace. Raises :class:`TraceError` for a
        factor that is not finite and positive.
        """
        for label, v in (("time", time), ("rate", rate)):
            if not np.isfinite(v) or v <= 0:
                raise TraceError(f"{label} scale must be finite and > 0, got {v}", column=label)
        rng = np.random.default_rng(seed)
        out = self
        if rate != 1.0 and len(self):
            if rate < 1.0:
                out = self.take(rng.random(len(self)) < rate)
            else:
                out = self._thickened(rate, rng)
        if time != 1.0:
            out = out.take(np.arange(len(out)))
            out.t_ms = _frozen(out.t_ms * time)
            if out.duration_ms is not None:
                out.duration_ms = _frozen(out.duration_ms * time)
        return out

    def _thickened(self, rate: float, rng: np.random.Generator) -> Trace:
        n = len(self)
        whole = int(np.floor(rate))
        copies = np.full(n, whole, dtype=np.int64)
        copies += rng.random(n) < (rate - whole)
        origin = np.repeat(np.arange(n), copies)
        # the first copy of each arrival stays where it was; the others spread to the next one
        first = np.zeros(origin.shape[0], dtype=bool)
        starts = np.concatenate(([0], np.cumsum(copies)[:-1]))
        first[starts[copies > 0]] = True
        gap = np.append(np.diff(self.t_ms), 0.0)
        t = self.t_ms[origin] + np.where(first, 0.0, rng.random(origin.shape[0]) * gap[origin])
        order = np.argsort(t, kind="stable")
        idx = origin[order]
        return Trace(
            t_ms=t[order],
            source=self.source[idx],
            prompt_tokens=self.prompt_tokens[idx],
            output_tokens=self.output_tokens[idx],
            sources=self.sources,
            name=self.name,
            duration_ms=None if self.duration_ms is None else self.duration_ms[idx],
            source_memory_mb=self.source_memory_mb,
        )

    def counts_by_source(self) -> npt.NDArray[np.int64]:
        """Arrivals per source, indexed like ``sources``."""
        return np.bincount(self.source, minlength=len(self.sources)).astype(np.int64)


_A = TypeVar("_A", bound=np.ndarray)  # type: ignore[type-arg]


def _frozen(arr: _A) -> _A:
    """A read-only view: the caller's own array stays writeable."""
    out = arr.view()
    out.flags.writeable = False
    return out  # type: ignore[return-value]
