"""The free pages of one pool arena, kept as runs; pure bookkeeping (no tensors).

A page is one rank row of an arena (:mod:`vajra.gpu.lora.pool`). Any free page serves any
adapter, so taking and giving pages back in any order never strands memory: ``n`` pages can be
taken whenever ``n`` are free. Contiguity is only a convenience (one copy and a plain slice
per run), so :meth:`PageRuns.take` prefers the smallest single run that fits (best fit) and
falls back to the lowest runs.
"""

from __future__ import annotations

import bisect

Run = tuple[int, int]  # (first page, number of pages)


class PageRuns:
    """Free pages ``first .. first + count - 1`` at start, as sorted, disjoint, non-touching
    runs."""

    def __init__(self, first: int, count: int) -> None:
        self._runs: list[Run] = [(first, count)] if count > 0 else []
        self.free = count

    @property
    def runs(self) -> tuple[Run, ...]:
        return tuple(self._runs)

    def take(self, n: int) -> list[Run]:
        """``n`` free pages as runs in page order; ``n`` must be at most :attr:`free`."""
        if n > self.free:
            raise ValueError(f"{n} pages asked, {self.free} free")
        if n <= 0:
            return []
        fits = [(length, i) for i, (_, length) in enumerate(self._runs) if length >= n]
        if fits:
            _, i = min(fits)
            start, length = self._runs[i]
            if length == n:
                del self._runs[i]
            else:
                self._runs[i] = (start + n, length - n)
            self.free -= n
            return [(start, n)]
        taken: list[Run] = []
        while n:
            start, length = self._runs[0]
            part = min(length, n)
            taken.append((start, part))
            if part == length:
                del self._runs[0]
            else:
                self._runs[0] = (start + part, length - part)
            n -= part
            self.free -= part
        return taken

    def give(self, runs: list[Run]) -> None:
        """Return pages taken earlier (merged with free neighbours)."""
        for start, length in runs:
            i = bisect.bisect_left(self._runs, (start, 0))
            if i > 0:
                prev_start, prev_len = self._runs[i - 1]
                if prev_start + prev_len > start:
                    raise ValueError(f"pages {start}.. are already free")
                if prev_start + prev_len == start:
                    i -= 1
                    start, length = prev_start, prev_len + length
                    del self._runs[i]
            if i < len(self._runs):
                next_start, next_len = self._runs[i]
                if start + length > next_start:
                    raise ValueError(f"pages {start}.. are already free")
                if start + length == next_start:
                    length += next_len
                    del self._runs[i]
            self._runs.insert(i, (start, length))
        self.free += sum(length for _, length in runs)


def expand(runs: list[Run]) -> list[int]:
    """The pages of ``runs``, in order."""
    return [page for start, length in runs for page in range(start, start + length)]
