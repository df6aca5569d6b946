"""The scheduler's placement: Algorithm 2 over what the executors report, provisioning, and
the routing of the predictor's tier commands.

Data flows left to right::

    executors ─ExecutorHello / LoadReport (load, residency per tier)─▶ LivePlacement (index)
    gateway ─InferWork─▶ LivePlacement.choose ─▶ an executor | waiting for room | no_capacity
    predictor ─AdapterTierCommand─▶ LivePlacement.route_tier_command ─▶ executors
    predictor ─AdapterForecasts─▶ LivePlacement.forecasts_for ─▶ each executor, its GPU digests

* The index (:class:`~vajra.policies.placement.PlacementIndex`) is keyed by (tenant, adapter
  digest). Executors report digests per tier; a digest counts as resident for every tenant
  that has sent a request for it (learnt from the requests placed), so two tenants with
  byte-identical adapters share locality but never affinity.
* ``InferWork`` carries no base model, and a Vajra cluster serves one: every executor sits in
  one pool (:data:`POOL`).
* Load: ``inflight`` is what the scheduler dispatched and no report has listed as finished
  (it moves with every dispatch, so a burst spreads); an executor is full when that, or
  its own last report (queued + running), reaches batch plus queue: a burst between two
  reports is held here rather than refused by the executor as ``overloaded``.
* No candidate: the :class:`~vajra.policies.provisioning.CapacityProvisioner` decides. With
  ``provisioning.local_executor_start`` it may *start* an executor: the scheduler publishes a
  :class:`~vajra.bus.messages.CapacityWanted` that ``vajra up``'s supervisor acts on
  (:mod:`vajra.actors.executor_scaler`), one start at a time, up to
  ``provisioning.max_executors``; a start counts as pending until an executor new to this
  scheduler joins or ``provisioning.executor_start_s`` passed. Either way the request is held
  in a bounded FIFO, retried whenever a load report or a new executor may have made room, for
  up to ``scheduler.no_capacity_wait_ms`` (with local starts: at least
  ``executor_start_s``), never past its deadline, then answered ``no_capacity``.
* Re-dispatch: the body of every non-streaming request is kept until it finishes; when its
  executor is lost, it is placed again once. A streaming request may already have sent
  tokens, which only its gateway knows: it is answered ``unavailable`` (field ``executor``)
  and the gateway places it once more if no token went out.

Errors: nothing here raises; decisions come back as values and the scheduler sends the replies.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from vajra.bus.messages import (
    AdapterForecasts,
    AdapterTierCommand,
    CapacityWanted,
    InferWork,
    LoadReport,
)
from vajra.config import VajraConfig
from vajra.errors import NoCapacityError, UnavailableError, VajraError
from vajra.policies.placement import (
    AdapterKey,
    ExecutorState,
    PlacementIndex,
    PlacementWeights,
    Tier,
)
from vajra.policies.provisioning import CapacityProvisioner, ProvisionAction

log = logging.getLogger("vajra.scheduler")

POOL = "*"  # the one base-model pool (see the module docstring)
MAX_WAITING = 4_096  # requests held for room at once; beyond: no_capacity at once
_TIER_NAMES = {"gpu": Tier.GPU, "host": Tier.HOST, "disk": Tier.DISK}


@dataclass(slots=True)
class Waiting:
    gateway: bytes
    work: InferWork
    body: Sequence[bytes]
    since_ms: float
    until_ms: float


@dataclass(slots=True)
class _Kept:
    work: InferWork
    body: Sequence[bytes]
    redispatched: bool = False


def adapter_key(work: InferWork) -> AdapterKey:
    return (work.tenant_id, work.adapter_digest or "")


class LivePlacement:
    """Placement state of one scheduler incarnation; see the module docstring."""

    def __init__(self, cfg: VajraConfig, counters: Counter[str]) -> None:
        p, s = cfg.policies, cfg.scheduler
        self.index = PlacementIndex(
            PlacementWeights(p.placement_alpha, p.placement_beta, p.placement_gamma),
            affinity_window=s.affinity_window,
            affinity_ttl_ms=s.affinity_ttl_ms,
        )
        prov = cfg.provisioning
        start_ms = prov.executor_start_s * 1000.0
        self.provisioner = CapacityProvisioner(
            allow_start=prov.local_executor_start,
            max_executors=prov.max_executors,
            max_wait_ms=max(s.no_capacity_wait_ms, start_ms if prov.local_executor_start else 0),
            start_ms=start_ms,
        )
        self._wanted: CapacityWanted | None = None  # a start decided, not yet published
        self.counters = counters
        self.waiting: deque[Waiting] = deque()
        self._kept: dict[str, _Kept] = {}
        self._tiers: dict[str, dict[str, Tier]] = {}  # executor -> digest -> tier
        self._holders: dict[str, dict[str, Tier]] = {}  # digest -> executor -> tier
        self._tenants: dict[str, set[str]] = {}  # digest -> tenants that asked for it
        self._load_ms: dict[str, dict[str, float]] = {}  # executor -> tier -> mean load ms

    # --- executors --------------------------------------------------------------------------

    def joined(self, executor_id: str, max_batch_size: int, max_queue: int) -> None:
        if executor_id not in self.index.executors:
            self.provisioner.started(POOL)  # the oldest pending start, if any, is done
        self.removed(executor_id)
        self.index.upsert_executor(
            ExecutorState(
                executor_id,
                POOL,
                max_batch_size=max(1, max_batch_size),
                max_queue=max(0, max_queue),
                reported_load=0,
            )
        )
        self.provisioner.set_running(POOL, len(self.index.executors))
        self._tiers[executor_id] = {}

    def load_changed(
        self, executor_id: str, *, dispatched: int, max_batch_size: int, max_queue: int
    ) -> None:
        state = self.index.executors.get(executor_id)
        if state is not None:
            self.index.upsert_executor(
                replace(
                    state,
                    inflight=dispatched,
                    max_batch_size=max(1, max_batch_size),
                    max_queue=max(0, max_queue),
                )
            )

    def reported(self, report: LoadReport, dispatched: int) -> None:
        """A load report: load, slots and residency per tier."""
        state = self.index.executors.get(report.executor_id)
        if state is None:
            return
        slots = report.gpu_slots if report.gpu_slots > 0 else state.gpu_slots
        self.index.upsert_executor(
            replace(
                state,
                inflight=dispatched,
                reported_load=max(0, report.queue_depth) + max(0, report.running),
                draining=report.draining,
                active_adapters=max(0, report.active_adapters),
                gpu_slots=slots,
                gpu_slots_free=max(0, report.gpu_slots_free) if report.gpu_slots > 0 else slots,
            )
        )
        if report.tier_load_ms:
            self._load_ms[report.executor_id] = dict(report.tier_load_ms)
        new: dict[str, Tier] = {}
        for tier, digests in (
            (Tier.DISK, report.disk_adapters),
            (Tier.HOST, report.host_adapters),
            (Tier.GPU, report.resident_adapters),
        ):
            for d in digests:
                new[d] = tier
        old = self._tiers.get(report.executor_id, {})
        if new == old:
            return
        for d in old.keys() - new.keys():
            self._set(report.executor_id, d, None)
        for d, tier in new.items():
            if old.get(d) != tier:
                self._set(report.executor_id, d, tier)
        self._tiers[report.executor_id] = new

    def forecasts_for(
        self, msg: AdapterForecasts, executors: Iterable[str]
    ) -> list[tuple[str, AdapterForecasts]]:
        """The predictor's forecasts cut per executor: each gets those of the digests its last
        report listed in GPU memory (none: nothing sent to it)."""
        if len(msg.digests) != len(msg.next_arrival_ms):
            self.counters["forecasts_malformed"] += 1
            return []
        at = dict(zip(msg.digests, msg.next_arrival_ms, strict=True))
        out = []
        for eid in executors:
            mine = [
                d for d, tier in self._tiers.get(eid, {}).items() if tier == Tier.GPU and d in at
            ]
            if mine:
                part = AdapterForecasts(mine, [at[d] for d in mine], msg.sent_unix_ms)
                out.append((eid, part))
        return out

    def tier_load_ms(self) -> dict[str, float]:
        """Mean measured load time into each tier across the executors' last reports."""
        sums: dict[str, list[float]] = {}
        for per_tier in self._load_ms.values():
            for tier, ms in per_tier.items():
                sums.setdefault(tier, []).append(ms)
        return {t: sum(v) / len(v) for t, v in sums.items()}

    def removed(self, executor_id: str) -> None:
        self._load_ms.pop(executor_id, None)
        for d in self._tiers.pop(executor_id, {}):
            holders = self._holders.get(d)
            if holders is not None:
                holders.pop(executor_id, None)
                if not holders:
                    del self._holders[d]
        self.index.remove_executor(executor_id)
        self.provisioner.set_running(POOL, len(self.index.executors))

    def _set(self, executor_id: str, digest: str, tier: Tier | None) -> None:
        holders = self._holders.setdefault(digest, {})
        if tier is None:
            holders.pop(executor_id, None)
            if not holders:
                del self._holders[digest]
        else:
            holders[executor_id] = tier
        for tenant in self._tenants.get(digest, ()):
            self.index.set_residency(executor_id, (tenant, digest), tier)

    # --- requests ---------------------------------------------------------------------------

    def choose(self, work: InferWork, now_ms: float) -> str | None:
        key = adapter_key(work)
        self._learn(key)
        placement = self.index.choose(key, POOL, now_ms=now_ms)
        if placement is None:
            return None
        self.counters[f"placed_tier_{placement.tier.name.lower()}"] += 1
        return placement.executor_id

    def placed(
        self, work: InferWork, executor_id: str, body: Sequence[bytes], now_ms: float
    ) -> None:
        self.index.note_placement(adapter_key(work), executor_id, now_ms)
        if not work.stream:
            kept = self._kept.get(work.request_id)
            if kept is None:
                self._kept[work.request_id] = _Kept(work, body)

    def finished(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self._kept.pop(rid, None)

    def take_redispatch(self, request_id: str) -> _Kept | None:
        """The kept request to place again after its executor was lost (once), or None."""
        kept = self._kept.get(request_id)
        if kept is None or kept.redispatched:
            self._kept.pop(request_id, None)
            return None
        kept.redispatched = True
        return kept

    def _learn(self, key: AdapterKey) -> None:
        tenant, digest = key
        if not digest:
            return
        tenants = self._tenants.setdefault(digest, set())
        if tenant not in tenants:
            tenants.add(tenant)
            for eid, tier in self._holders.get(digest, {}).items():
                self.index.set_residency(eid, key, tier)

    # --- waiting for room -------------------------------------------------------------------

    def hold(
        self,
        gateway: bytes,
        work: InferWork,
        body: Sequence[bytes],
        now_ms: float,
        deadline_ms: float,
    ) -> VajraError | None:
        """No executor had room: hold the request (None) or the error to answer it with."""
        if not self.index.executors:
            return UnavailableError("no executor is serving yet; retry")
        if len(self.waiting) >= MAX_WAITING:
            self.counters["no_capacity"] += 1
            return NoCapacityError("no executor has room for this request; retry later")
        decision = self.provisioner.provision(POOL, now_ms)
        if decision.action == ProvisionAction.REFUSE:
            self.counters["no_capacity"] += 1
            return NoCapacityError("no executor has room for this request; retry later")
        if decision.action == ProvisionAction.START:
            self.counters["executor_starts_asked"] += 1
            starting = len(self.provisioner.pending.get(POOL, ()))
            self._wanted = CapacityWanted(
                executors=len(self.index.executors) + starting, waiting=len(self.waiting) + 1
            )
        until = min(decision.until_ms or now_ms, deadline_ms)
        self.waiting.append(Waiting(gateway, work, body, now_ms, until))
        self.counters["held_for_room"] += 1
        return None

    def take_capacity_wanted(self) -> CapacityWanted | None:
        """The start decided since the last call, for the scheduler to publish (or None)."""
        wanted, self._wanted = self._wanted, None
        return wanted

    def expired_error(self) -> VajraError:
        """What a held request whose wait is over is answered with."""
        self.counters["no_capacity"] += 1
        if not self.index.executors:
            return UnavailableError("no executor is serving any more; retry")
        return NoCapacityError("no executor had room for this request in time; retry later")

    def cancel_held(self, request_ids: Sequence[str]) -> set[str]:
        """Drop held requests the gateway cancelled; the ids dropped."""
        wanted = set(request_ids)
        dropped = {w.work.request_id for w in self.waiting if w.work.request_id in wanted}
        if dropped:
            self.waiting = deque(w for w in self.waiting if w.work.request_id not in dropped)
        return dropped

    def take_waiting(self) -> list[Waiting]:
        """Every held request, oldest first, for the scheduler to try again."""
        out = list(self.waiting)
        self.waiting.clear()
        return out

    # --- tier commands ----------------------------------------------------------------------

    def route_tier_command(self, cmd: AdapterTierCommand, now_ms: float) -> list[str]:
        """The executors a tier command goes to: its own executor when named and known; else,
        for a promote, where placement would send the tenant's next request for it; for a
        demote, every executor holding it in a tier above ``cmd.tier``'s floor."""
        if cmd.executor_id:
            return [cmd.executor_id] if cmd.executor_id in self.index.executors else []
        if cmd.action == "promote":
            key = (cmd.tenant_id, cmd.adapter_digest)
            self._learn(key)
            p = self.index.choose(key, POOL, now_ms=now_ms)
            return [] if p is None else [p.executor_id]
        floor = _TIER_NAMES.get(cmd.tier)
        if floor is None:
            return []
        return [
            eid for eid, tier in self._holders.get(cmd.adapter_digest, {}).items() if tier <= floor
        ]
