"""Mapping a trace's sources (functions, apps, services) onto adapter indices.

Sources are ranked by popularity (most arrivals first, ties by first appearance), so adapter 0
is always the busiest:

- ``one-to-one``: the source of rank r becomes adapter r (needs at least as many adapters as
  sources that have arrivals);
- ``striped``: rank r becomes adapter ``r % adapters`` (AlpaServe's striping: busy and quiet
  sources share adapters round-robin);
- ``power-law``: every arrival draws its adapter S-LoRA's way, ``floor(power(alpha) * N)``,
  whatever its source (for traces with one source, like the Azure LLM ones).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from vajra.traces._trace import Trace, TraceError

MappingMode = Literal["one-to-one", "striped", "power-law"]


def map_to_adapters(
    trace: Trace,
    adapters: int,
    *,
    mode: MappingMode,
    alpha: float = 1.0,
    seed: int = 0,
) -> Trace:
    """A trace whose sources are ``"0" .. str(adapters - 1)``; times and sizes unchanged.

    Raises :class:`TraceError` when ``adapters`` is below 1, the mode is unknown, or
    ``one-to-one`` is asked of more active sources than adapters.
    """
    if isinstance(adapters, bool) or not isinstance(adapters, int) or adapters < 1:
        raise TraceError(
            f"adapters must be a whole number >= 1, got {adapters!r}", column="adapters"
        )
    names = [str(i) for i in range(adapters)]
    if mode == "power-law":
        if not np.isfinite(alpha) or alpha <= 0:
            raise TraceError(f"alpha must be finite and > 0, got {alpha}", column="alpha")
        rng = np.random.default_rng(seed)
        drawn = (rng.power(alpha, size=len(trace)) * adapters).astype(np.int64)
        return _with_sources(trace, np.minimum(drawn, adapters - 1), names, None)
    if mode not in ("one-to-one", "striped"):
        raise TraceError(f"unknown mapping mode {mode!r}", column="mode")
    counts = trace.counts_by_source()
    active = int(np.count_nonzero(counts))
    # rank: busiest first; a stable sort on -count keeps first-seen order among equals
    rank_order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(rank_order)
    rank[rank_order] = np.arange(rank_order.shape[0])
    if mode == "one-to-one":
        if active > adapters:
            raise TraceError(
                f"one-to-one needs {active} adapters for {active} active sources, got {adapters}; "
                "use striped",
                column="adapters",
            )
        memory = None
        if trace.source_memory_mb is not None:
            memory = np.full(adapters, np.nan)
            keep = rank_order[:active]
            memory[:active] = trace.source_memory_mb[keep]
        return _with_sources(trace, rank[trace.source], names, memory)
    return _with_sources(trace, rank[trace.source] % adapters, names, None)


def _with_sources(
    trace: Trace,
    source: np.ndarray,
    names: list[str],
    memory: np.ndarray | None,  # type: ignore[type-arg]
) -> Trace:
    return Trace(
        t_ms=trace.t_ms,
        source=source.astype(np.int32),
        prompt_tokens=trace.prompt_tokens,
        output_tokens=trace.output_tokens,
        sources=names,
        name=trace.name,
        duration_ms=trace.duration_ms,
        source_memory_mb=memory,
    )
