"""Placement of a training job: Algorithm 2's score over the executors with a free training slot.

A training job runs on one executor for many steps, between that executor's inference steps.
It is placed like a request, with the same score
(:meth:`vajra.policies.placement.PlacementIndex.score`: load, the locality of the job's
starting adapter on the executor, the affinity of the tenant's requests on it), but its candidates are different:
executors of the job's base model that are not draining and have a free training slot (jobs
running there plus jobs offered and not yet seen running, below its slots). An executor
whose inference batch is full is still a candidate: its load score says how busy it is, and
training yields to inference there anyway.

Jobs are rare next to requests, so a decision scores every executor with a free slot:
O(m) for m such executors (the request path's index is what makes requests cheap; it is not
needed here). Ties go to the smallest executor id. Pure code: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vajra.policies.placement import AdapterKey, PlacementIndex, Tier

__all__ = ["TrainingSlots", "choose_job_executor"]


@dataclass(frozen=True, slots=True)
class TrainingSlots:
    """One executor's training capacity as placement sees it."""

    executor_id: str
    used: int  # jobs running there plus jobs offered to it and not yet seen running
    slots: int  # jobs it may run at once (0: it does not train)


def choose_job_executor(
    index: PlacementIndex,
    key: AdapterKey,
    base_model: str,
    slots: Iterable[TrainingSlots],
    *,
    now_ms: float,
) -> str | None:
    """The executor to run the job on, or None when no executor has a free slot.

    ``key`` is (tenant, digest of the version the job starts from); a fresh adapter has no
    digest (``""``) and so no locality anywhere. Executors unknown to ``index`` are skipped.
    """
    holders = index.holders(key) if key[1] else {}
    best: tuple[float, str] | None = None
    for s in slots:
        if s.used >= s.slots:
            continue
        state = index.executors.get(s.executor_id)
        if state is None or state.base_model != base_model or state.draining:
            continue
        tier = holders.get(s.executor_id, Tier.REMOTE)
        affinity = index.affinity(key, s.executor_id, now_ms)
        total = index.score(state, tier, affinity)[0]
        if best is None or total > best[0] or (total == best[0] and s.executor_id < best[1]):
            best = (total, s.executor_id)
    return None if best is None else best[1]
