"""Placement of a request on an executor.

For now the score is load alone: the executor with the most free capacity wins, ties broken
by fewest requests in flight and then by id (deterministic). Adapter locality and tenant
affinity (the paper's Algorithm 2) join the score when the adapter registry lands.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ExecutorLoad:
    """What placement needs to know about one executor."""

    executor_id: str
    inflight: int  # requests dispatched to it and not yet reported finished (lags a report)
    max_batch_size: int
    max_queue: int
    draining: bool = False
    reported_load: int = 0  # queued + running at its last report


def load_score(e: ExecutorLoad) -> float:
    """1.0 for an idle executor, falling to 0.0 when batch and queue are full."""
    capacity = max(1, e.max_batch_size + e.max_queue)
    return max(0.0, 1.0 - e.inflight / capacity)


def is_full(e: ExecutorLoad) -> bool:
    """Full by its own last report; bursts between reports are bounded by the executor's queue."""
    return e.reported_load >= e.max_batch_size + e.max_queue


def choose_executor(candidates: Iterable[ExecutorLoad]) -> ExecutorLoad | None:
    """The best executor for a request, or None when none can take it (all full or draining)."""
    best: ExecutorLoad | None = None
    best_key: tuple[float, int, str] | None = None
    for e in candidates:
        if e.draining or is_full(e):
            continue
        key = (-load_score(e), e.inflight, e.executor_id)
        if best_key is None or key < best_key:
            best, best_key = e, key
    return best
