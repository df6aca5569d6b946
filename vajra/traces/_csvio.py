"""Reading trace CSV files strictly: every fault names its row (1-based file line) and column.

Files may be gzip-compressed (a ``.gz`` suffix), may start with a UTF-8 byte-order mark and may
lack a final newline (the public Azure samples do). Cells are converted a column at a time with
numpy; only when a column fails to convert is it walked cell by cell to find the bad one.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import numpy.typing as npt

from vajra.traces._trace import MAX_INT32, TraceError

# A cell longer than this is not a number or a hash in any trace we read.
_MAX_FIELD = 4096


@contextmanager
def open_text(path: Path) -> Iterator[TextIO]:
    """Open ``path`` as text (gunzipping ``*.gz``), dropping a byte-order mark."""
    if not path.is_file():
        raise TraceError(f"no such trace file: {path}")
    if path.suffix == ".gz":
        with (
            gzip.open(path, "rb") as raw,
            io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh,
        ):
            yield fh
    else:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            yield fh


@dataclass(slots=True)
class Table:
    """A CSV's header and its data rows, with the file line of each row."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]

    def column(self, *names: str, required: bool = True) -> int:
        """Index of the first of ``names`` found in the header (case-sensitive), or -1."""
        for name in names:
            if name in self.header:
                return self.header.index(name)
        if required:
            raise TraceError(
                f"{self.path.name} has no column {' or '.join(map(repr, names))}; "
                f"its header is {self.header[:6]}{'...' if len(self.header) > 6 else ''}",
                row=1,
                column=names[0],
            )
        return -1

    def strings(self, idx: int) -> list[str]:
        return [r[idx] for r in self.rows]

    def floats(
        self,
        idx: int,
        *,
        minimum: float | None = 0.0,
        maximum: float | None = None,
        integer: bool = False,
    ) -> npt.NDArray[np.float64]:
        """Column ``idx`` as float64; NaN, infinity, text and out-of-range values raise."""
        return self.float_block([idx], minimum=minimum, maximum=maximum, integer=integer)[:, 0]

    def float_block(
        self,
        cols: Sequence[int],
        *,
        minimum: float | None = 0.0,
        maximum: float | None = None,
        integer: bool = False,
    ) -> npt.NDArray[np.float64]:
        """Columns ``cols`` as a (rows, len(cols)) float64 matrix, validated like :meth:`floats`."""
        text = np.array([[r[c] for c in cols] for r in self.rows], dtype=str).reshape(
            len(self.rows), len(cols)
        )
        try:
            # strip so " 3" parses; np.strings would be faster but needs numpy 2
            values = np.char.strip(text).astype(np.float64)
        except ValueError:
            self._raise_first_unparsable(text, cols)
            raise  # unreachable: the scan above always raises
        bad = ~np.isfinite(values)
        if minimum is not None:
            bad |= values < minimum
        if maximum is not None:
            bad |= values > maximum
        if integer:
            bad |= values != np.floor(values)
        if bad.any():
            r, c = (int(x) for x in np.argwhere(bad)[0])
            v = values[r, c]
            why = (
                "is NaN or infinite"
                if not np.isfinite(v)
                else f"is below {minimum}"
                if minimum is not None and v < minimum
                else f"is above {maximum}"
                if maximum is not None and v > maximum
                else "is not a whole number"
            )
            raise TraceError(
                f"value {text[r, c]!r} {why}", row=self.lines[r], column=self.header[cols[c]]
            )
        return values

    def ints(self, idx: int, *, maximum: int = MAX_INT32) -> npt.NDArray[np.int64]:
        """Column ``idx`` as non-negative whole numbers (written as ``7`` or ``7.0``)."""
        return self.floats(idx, minimum=0, maximum=maximum, integer=True).astype(np.int64)

    def _raise_first_unparsable(self, text: npt.NDArray[np.str_], cols: Sequence[int]) -> None:
        for r in range(text.shape[0]):
            for c in range(text.shape[1]):
                try:
                    float(text[r, c])
                except ValueError:
                    raise TraceError(
                        f"cannot read {text[r, c][:40]!r} as a number",
                        row=self.lines[r],
                        column=self.header[cols[c]],
                    ) from None
        raise TraceError("a value could not be read as a number", row=self.lines[0])


def read_table(path: Path) -> Table:
    """Read the whole CSV at ``path``.

    Raises :class:`TraceError` for a missing or empty file, a header with no data rows, a row
    with too few or too many fields (a truncated line), an over-long cell, bytes that are not
    UTF-8, or a line the csv module cannot parse (a NUL byte, an unclosed quote).
    """
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    reader = None
    try:
        with open_text(path) as fh:
            csv.field_size_limit(_MAX_FIELD * 4)
            reader = csv.reader(fh, strict=True)
            for row in reader:
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if header is None:
                    header = [h.strip() for h in row]
                    if len(set(header)) != len(header):
                        dup = next(h for h in header if header.count(h) > 1)
                        raise TraceError(
                            "the header repeats a column", row=reader.line_num, column=dup
                        )
                    continue
                if len(row) != len(header):
                    col = header[len(row)] if len(row) < len(header) else "<extra field>"
                    raise TraceError(
                        f"{len(row)} fields where the header has {len(header)} (truncated line?)",
                        row=reader.line_num,
                        column=col,
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except csv.Error as exc:
        line = None if reader is None else reader.line_num
        raise TraceError(f"{path.name}: malformed CSV: {exc}", row=line) from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path.name} is not UTF-8 text: {exc.reason}") from None
    except (OSError, EOFError) as exc:
        raise TraceError(f"cannot read {path}: {exc}") from None
    if header is None:
        raise TraceError(f"{path.name} is empty", row=1)
    if not rows:
        raise TraceError(f"{path.name} has a header but no data rows", row=2)
    for r, row in zip(lines, rows, strict=True):
        for c, cell in enumerate(row):
            if len(cell) > _MAX_FIELD or "\x00" in cell:
                raise TraceError("cell is too long or holds a NUL byte", row=r, column=header[c])
    return Table(path=path, header=header, rows=rows, lines=lines)


def find_file(base: Path, *names: str) -> Path | None:
    """The first of ``names`` (plain or ``.gz``) that exists in directory ``base``."""
    for name in names:
        for candidate in (base / name, base / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None
