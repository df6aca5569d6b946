"""Azure LLM inference traces, 2023 and 2024: ``TIMESTAMP,ContextTokens,GeneratedTokens``.

2023 timestamps look like ``2023-11-16 18:15:46.6805900`` (7 fraction digits, no zone); 2024
ones like ``2024-05-10 00:00:00.009930+00:00`` (a UTC offset, sometimes no fraction). Both forms
are accepted by both formats (a ``T`` separator and a ``Z`` suffix too); times with an offset
are moved to UTC, times without one are taken as UTC. ``t_ms`` counts from the earliest
request. The trace has one source (the file's service, e.g. ``code``); spread it over
adapters with :func:`map_to_adapters` in ``power-law`` mode.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vajra.traces._csvio import read_table
from vajra.traces._trace import Trace, TraceError

_STAMP = re.compile(
    r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(\.\d{1,9})?\s*(Z|[+-]\d{2}:?\d{2})?"
)


def parse_timestamps(stamps: list[str], lines: list[int], column: str) -> npt.NDArray[np.int64]:
    """Nanoseconds since the epoch (UTC) for each stamp; raises :class:`TraceError` naming
    the row of the first stamp that is not one of the accepted forms or not a real date."""
    plain: list[str] = []
    offset_min = np.zeros(len(stamps), dtype=np.int64)
    for i, raw in enumerate(stamps):
        m = _STAMP.fullmatch(raw.strip())
        if m is None:
            raise TraceError(
                f"cannot read {raw[:40]!r} as a timestamp", row=lines[i], column=column
            )
        date, clock, frac, zone = m.groups()
        plain.append(f"{date}T{clock}{frac or ''}")
        if zone and zone != "Z":
            sign = -1 if zone[0] == "-" else 1
            digits = zone[1:].replace(":", "")
            hours, minutes = int(digits[:2]), int(digits[2:])
            if hours > 23 or minutes > 59:
                raise TraceError(f"bad UTC offset {zone!r}", row=lines[i], column=column)
            offset_min[i] = sign * (hours * 60 + minutes)
    try:
        ns = np.array(plain, dtype="datetime64[ns]").astype(np.int64)
    except ValueError:
        for i, p in enumerate(plain):
            try:
                np.datetime64(p, "ns")
            except ValueError:
                raise TraceError(
                    f"{stamps[i][:40]!r} is not a real date and time", row=lines[i], column=column
                ) from None
        raise
    return ns - offset_min * 60_000_000_000


def load_azure_llm(path: Path, *, year: int, source: str | None = None) -> Trace:
    """Load an Azure LLM inference trace (``year`` only names the trace; both timestamp forms
    are read either way). Raises :class:`TraceError` for a missing column, an unreadable
    timestamp, or token counts that are negative, fractional, NaN or beyond int32."""
    table = read_table(path)
    ts_col = table.column("TIMESTAMP", "timestamp", "Timestamp")
    ctx_col = table.column("ContextTokens")
    gen_col = table.column("GeneratedTokens")
    ns = parse_timestamps(table.strings(ts_col), table.lines, table.header[ts_col])
    prompt = table.ints(ctx_col)
    output = table.ints(gen_col)
    order = np.argsort(ns, kind="stable")
    t_ms = (ns[order] - ns[order[0]]).astype(np.float64) / 1e6
    stem = path.name.split(".")[0]
    name = source or stem.removeprefix("AzureLLMInferenceTrace_") or "llm"
    return Trace(
        t_ms=t_ms,
        source=np.zeros(len(t_ms), dtype=np.int32),
        prompt_tokens=prompt[order],
        output_tokens=output[order],
        sources=[name],
        name=f"azure-llm-{year}:{stem}",
    )
