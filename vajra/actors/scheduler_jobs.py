"""The scheduler's training-job placement: which executor each queued job is offered to.

Data flows left to right::

    gateway|executor ─JobQueued─▶ JobPlacement ─plan (Algorithm 2 over free training slots)─▶
        JobOffer ─▶ that executor ─claims the job by id in Redis─▶ it runs there
    executors ─LoadReport (training_jobs, training_slots)─▶ JobPlacement

A queued job is a hint here: the job's record in Redis is the truth. Each hint is offered to
the executor :func:`~vajra.policies.job_placement.choose_job_executor` picks (the request
index's load, residency and affinity, among executors with a free training slot; an offer
counts against the slot until that executor reports the job running or the offer times out).
A hint leaves when some executor reports the job running, after :data:`MAX_OFFERS` offers
that did not take (the job was cancelled, or claimed elsewhere), or after
``training.placement_wait_s`` x :data:`HINT_TTL_WAITS`. Whatever placement does not get to
(a scheduler restart loses every hint, a lost offer, no free slot) any executor claims once
the job has waited ``training.placement_wait_s``: placement decides where, never whether.

Errors: nothing here raises; bad hints are dropped and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from vajra.actors.scheduler_placement import POOL
from vajra.bus.messages import JobQueued, LoadReport
from vajra.config import VajraConfig
from vajra.errors import InvalidRequest
from vajra.policies.job_placement import TrainingSlots, choose_job_executor
from vajra.policies.placement import PlacementIndex
from vajra.state.fields import check_id

__all__ = ["HINT_TTL_WAITS", "MAX_HINTS", "MAX_OFFERS", "OFFER_TIMEOUT_S", "JobPlacement"]

MAX_HINTS = 10_000  # queued jobs remembered at once; beyond, the oldest hint is dropped
MAX_OFFERS = 3  # offers of one job before placement leaves it to the executors' own claims
OFFER_TIMEOUT_S = 3.0  # an offer not seen running within this is counted free again
HINT_TTL_WAITS = 10  # a hint lives this many placement waits at most


@dataclass(slots=True)
class _Hint:
    tenant_id: str
    digest: str
    since_s: float
    offers: int = 0
    offered_to: str = ""
    offered_at_s: float = 0.0


class JobPlacement:
    """Training-job hints and offers of one scheduler incarnation (see the module docstring)."""

    def __init__(self, cfg: VajraConfig, index: PlacementIndex, counters: Counter[str]) -> None:
        self.index = index
        self.counters = counters
        self.ttl_s = max(OFFER_TIMEOUT_S, cfg.training.placement_wait_s * HINT_TTL_WAITS)
        self.hints: dict[str, _Hint] = {}  # job id -> hint, oldest first
        self._running: dict[str, set[str]] = {}  # executor -> jobs it reported running
        self._slots: dict[str, int] = {}  # executor -> its training slots

    def queued(self, msg: JobQueued, now_s: float) -> None:
        try:
            check_id(msg.job_id, "job_id")
            check_id(msg.tenant_id, "tenant_id")
        except InvalidRequest:
            self.counters["job_hints_malformed"] += 1
            return
        if msg.job_id in self.hints:
            return
        if len(self.hints) >= MAX_HINTS:
            del self.hints[next(iter(self.hints))]
            self.counters["job_hints_dropped"] += 1
        self.hints[msg.job_id] = _Hint(msg.tenant_id, str(msg.adapter_digest or ""), now_s)
        self.counters["job_hints"] += 1

    def reported(self, report: LoadReport) -> None:
        running = set(report.training_jobs)
        self._running[report.executor_id] = running
        self._slots[report.executor_id] = max(0, report.training_slots)
        for job_id in running:
            if self.hints.pop(job_id, None) is not None:
                self.counters["jobs_placed"] += 1

    def removed(self, executor_id: str) -> None:
        self._running.pop(executor_id, None)
        self._slots.pop(executor_id, None)
        for hint in self.hints.values():
            if hint.offered_to == executor_id:
                hint.offered_to = ""

    def plan(self, now_s: float, now_ms: float) -> list[tuple[str, str]]:
        """The offers to send now, as (executor id, job id), oldest job first."""
        used = {eid: len(jobs) for eid, jobs in self._running.items()}
        waiting: list[tuple[str, _Hint]] = []
        for job_id, hint in list(self.hints.items()):
            if now_s - hint.since_s > self.ttl_s:
                del self.hints[job_id]
                self.counters["job_hints_expired"] += 1
            elif hint.offered_to and now_s - hint.offered_at_s < OFFER_TIMEOUT_S:
                used[hint.offered_to] = used.get(hint.offered_to, 0) + 1
            elif hint.offers >= MAX_OFFERS:
                del self.hints[job_id]
                self.counters["job_hints_given_up"] += 1
            else:
                waiting.append((job_id, hint))
        offers: list[tuple[str, str]] = []
        for job_id, hint in waiting:
            slots = [TrainingSlots(e, used.get(e, 0), n) for e, n in self._slots.items()]
            key = (hint.tenant_id, hint.digest)
            eid = choose_job_executor(self.index, key, POOL, slots, now_ms=now_ms)
            if eid is None:
                hint.offered_to = ""
                continue
            hint.offers += 1
            hint.offered_to, hint.offered_at_s = eid, now_s
            used[eid] = used.get(eid, 0) + 1
            offers.append((eid, job_id))
        self.counters["job_offers"] += len(offers)
        return offers
