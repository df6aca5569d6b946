"""Azure Functions traces: 2019 (per-minute counts per function) and 2021 (per invocation).

The 2019 trace counts invocations per function per minute of a day. Loading expands each
count into that many arrivals inside its minute: ``spread="uniform"`` (default) draws each
arrival's offset uniformly in the minute from a seeded generator; ``spread="even"`` places
``c`` arrivals at ``(k + 0.5) / c`` of the minute. The durations file (average run time per
function, ms) becomes each arrival's ``duration_ms``; the memory file (average allocated MB
per app) becomes ``source_memory_mb``. The trace carries no tokens, so every arrival gets
``prompt_tokens`` and ``output_tokens`` (a count, or a (low, high) range drawn per arrival).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from vajra.traces._csvio import Table, find_file, read_table
from vajra.traces._synthetic import TokenSpec, draw_sizes
from vajra.traces._trace import Trace, TraceError

GroupBy = Literal["function", "app"]
MINUTE_MS = 60_000.0
# More invocations than this in one function-minute is not a real trace (the busiest Azure
# function peaks near 10^5 per minute).
MAX_PER_MINUTE = 100_000_000
DEFAULT_MAX_ARRIVALS = 200_000_000


def load_azure_functions_2019(
    path: Path,
    *,
    durations: Path | None = None,
    memory: Path | None = None,
    group_by: GroupBy = "function",
    spread: Literal["uniform", "even"] = "uniform",
    seed: int = 0,
    prompt_tokens: TokenSpec = 256,
    output_tokens: TokenSpec = 64,
    max_arrivals: int = DEFAULT_MAX_ARRIVALS,
) -> Trace:
    """Load a 2019 invocation-count file, or a directory holding ``invocations.csv``
    (and optionally ``durations.csv`` and ``memory.csv``, joined when present).

    Both published layouts are read: ``HashFunction,HashApp,HashOwner,minute_1..`` and
    ``HashOwner,HashApp,HashFunction,Trigger,1..1440``. Rows naming the same function are
    summed. Raises :class:`TraceError` (row and column named) for a missing column, a count
    that is negative, fractional, NaN or absurdly large, or more than ``max_arrivals`` in all.
    """
    if group_by not in ("function", "app"):
        raise TraceError(
            f"group_by must be 'function' or 'app', got {group_by!r}", column="group_by"
        )
    if spread not in ("uniform", "even"):
        raise TraceError(f"spread must be 'uniform' or 'even', got {spread!r}", column="spread")
    if path.is_dir():
        base = path
        found = find_file(base, "invocations.csv")
        if found is None:
            raise TraceError(f"{path} holds no invocations.csv")
        path = found
        durations = durations or find_file(base, "durations.csv")
        memory = memory or find_file(base, "memory.csv")
    table = read_table(path)
    f_col = table.column("HashFunction")
    a_col = table.column("HashApp")
    minutes = _minute_columns(table)
    counts = table.float_block(
        [c for c, _ in minutes], minimum=0, maximum=MAX_PER_MINUTE, integer=True
    ).astype(np.int64)
    functions = table.strings(f_col)
    apps = table.strings(a_col)
    total = int(counts.sum())
    if total > max_arrivals:
        raise TraceError(f"{total} arrivals is above max_arrivals={max_arrivals}", column="minute")
    fn_ms = _join_durations(durations, functions) if durations else None
    app_mb = _join_memory(memory) if memory else {}

    keys = functions if group_by == "function" else apps
    names: dict[str, int] = {}
    row_source = np.array([names.setdefault(k, len(names)) for k in keys], dtype=np.int32)
    sources = list(names)
    src_app = {k: a for k, a in zip(keys, apps, strict=True)}
    mem = np.array([app_mb.get(src_app[s], np.nan) for s in sources], dtype=np.float64)

    minute_idx = np.array([m for _, m in minutes], dtype=np.float64)
    flat = counts.ravel()
    cell = np.repeat(np.arange(flat.shape[0]), flat)
    rows = cell // counts.shape[1]
    start = minute_idx[cell % counts.shape[1]] * MINUTE_MS
    rng = np.random.default_rng(seed)
    if spread == "uniform":
        offset = rng.random(total) * MINUTE_MS
    else:
        first = np.repeat(np.cumsum(flat) - flat, flat)
        k = np.arange(total) - first
        offset = (k + 0.5) / flat[cell] * MINUTE_MS
    t = start + offset
    order = np.argsort(t, kind="stable")
    rows = rows[order]
    return Trace(
        t_ms=t[order],
        source=row_source[rows],
        prompt_tokens=draw_sizes(total, prompt_tokens, rng, "prompt_tokens"),
        output_tokens=draw_sizes(total, output_tokens, rng, "output_tokens"),
        sources=sources,
        name=f"azure-functions-2019:{path.parent.name}",
        duration_ms=None if fn_ms is None else fn_ms[rows],
        source_memory_mb=mem if memory else None,
    )


def _minute_columns(table: Table) -> list[tuple[int, int]]:
    """(column index, minute - 1) for every per-minute count column, in minute order."""
    found: list[tuple[int, int]] = []
    for c, name in enumerate(table.header):
        digits = name.removeprefix("minute_")
        if digits.isdigit() and digits.isascii():
            minute = int(digits)
            if minute < 1 or minute > 100_000:
                raise TraceError(f"minute {minute} is outside 1..100000", row=1, column=name)
            found.append((c, minute - 1))
    if not found:
        raise TraceError(
            f"{table.path.name} has no per-minute columns (minute_1.. or 1..1440)",
            row=1,
            column="minute_1",
        )
    found.sort(key=lambda cm: cm[1])
    return found


def _join_durations(path: Path, functions: list[str]) -> npt.NDArray[np.float64]:
    """Average duration (ms) of each invocation row's function; NaN where not listed."""
    table = read_table(path)
    names = table.strings(table.column("HashFunction"))
    avg = table.floats(table.column("Average"), minimum=0)
    by_name = dict(zip(names, avg.tolist(), strict=True))
    return np.array([by_name.get(f, np.nan) for f in functions], dtype=np.float64)


def _join_memory(path: Path) -> dict[str, float]:
    """Average allocated memory (MB) per app hash."""
    table = read_table(path)
    apps = table.strings(table.column("HashApp"))
    mb = table.floats(table.column("AverageAllocatedMb"), minimum=0)
    return dict(zip(apps, mb.tolist(), strict=True))


def load_azure_functions_2021(
    path: Path,
    *,
    group_by: GroupBy = "function",
    seed: int = 0,
    prompt_tokens: TokenSpec = 256,
    output_tokens: TokenSpec = 64,
) -> Trace:
    """Load the 2021 per-invocation trace (``app,func,end_timestamp,duration``, seconds).

    Each invocation arrives at ``end_timestamp - duration``; its duration becomes
    ``duration_ms``. Raises :class:`TraceError` for a missing column, a timestamp or duration
    that is not a finite number, a negative duration or one longer than its end time allows.
    """
    if group_by not in ("function", "app"):
        raise TraceError(
            f"group_by must be 'function' or 'app', got {group_by!r}", column="group_by"
        )
    table = read_table(path)
    f_col, a_col = table.column("func"), table.column("app")
    end_col, dur_col = table.column("end_timestamp"), table.column("duration")
    end_s = table.floats(end_col, minimum=0, maximum=1e12)
    dur_s = table.floats(dur_col, minimum=0, maximum=1e9)
    # the public file rounds duration to ms, so allow it to pass the end time by that much
    over = dur_s > end_s + 0.001
    if over.any():
        r = int(np.argmax(over))
        raise TraceError(
            "duration is longer than its end timestamp allows",
            row=table.lines[r],
            column="duration",
        )
    keys = table.strings(f_col if group_by == "function" else a_col)
    names: dict[str, int] = {}
    src = np.array([names.setdefault(k, len(names)) for k in keys], dtype=np.int32)
    start_ms = np.maximum(end_s - dur_s, 0.0) * 1000.0
    order = np.argsort(start_ms, kind="stable")
    n = len(keys)
    rng = np.random.default_rng(seed)
    return Trace(
        t_ms=start_ms[order],
        source=src[order],
        prompt_tokens=draw_sizes(n, prompt_tokens, rng, "prompt_tokens"),
        output_tokens=draw_sizes(n, output_tokens, rng, "output_tokens"),
        sources=list(names),
        name=f"azure-functions-2021:{path.name}",
        duration_ms=(dur_s * 1000.0)[order],
    )
