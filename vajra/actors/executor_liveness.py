"""The executor's liveness and load: what it tells the scheduler and Redis about itself.

Data flows left to right::

    executor ─ExecutorHello / LoadReport─▶ scheduler
    executor ─heartbeat─▶ Redis (TTL)

Every ``load_report_interval_s`` a LoadReport (queue depth, running rows, the ids finished
since the last one, resident adapters, draining, training jobs running and slots) goes to the
scheduler, and with it the usage recorded meanwhile goes to the ledger; every ``heartbeat_interval_s`` the hello is repeated
(so a restarted scheduler learns of this executor) and, with a cluster state, a heartbeat with
a TTL is written to Redis off the event loop. A heartbeat that fails is logged and retried at
the next interval.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import TYPE_CHECKING, Any

import trio

from vajra.actors.adapter_tiers import AdapterTiers
from vajra.actors.base import now_ms
from vajra.actors.executor_intake import Intake
from vajra.actors.executor_usage import UsageOutbox
from vajra.bus.codec import encode
from vajra.bus.messages import ExecutorHello, LoadReport
from vajra.bus.zsocket import ZSocket
from vajra.config import VajraConfig
from vajra.errors import VajraError
from vajra.gpu.interface import Engine
from vajra.state import ClusterState, ExecutorHeartbeat, OffLoop

if TYPE_CHECKING:
    from vajra.actors.executor_jobs import JobRunner

log = logging.getLogger("vajra.executor")


class Liveness:
    """Hellos, load reports and heartbeats of one executor incarnation."""

    def __init__(
        self,
        cfg: VajraConfig,
        work_in: ZSocket,
        engine: Engine,
        tiers: AdapterTiers | None,
        intake: Intake,
        usage: UsageOutbox,
        *,
        executor_id: str,
        incarnation: str,
        jobs: JobRunner | None = None,
    ) -> None:
        self.cfg = cfg
        self.ecfg = cfg.executor
        self.work_in = work_in
        self.engine = engine
        self.tiers = tiers
        self.intake = intake
        self.usage = usage
        self.executor_id = executor_id
        self.incarnation = incarnation
        self.jobs = jobs

    async def hello(self) -> None:
        hello = ExecutorHello(
            executor_id=self.executor_id,
            incarnation=self.incarnation,
            model=self.engine.model_name,
            max_batch_size=self.engine.max_batch_size,
            max_queue=self.ecfg.max_queue,
        )
        await self.work_in.send(encode(hello))

    async def send_load_report(self) -> None:
        report = LoadReport(
            executor_id=self.executor_id,
            incarnation=self.incarnation,
            queue_depth=self.intake.queue_depth(),
            running=self.engine.num_running(),
            finished_ids=self.intake.steps.take_finished(),
            resident_adapters=self.tiers.resident() if self.tiers else [],
            draining=self.intake.draining,
            **(tier_report(self.tiers) if self.tiers else {}),
            **(self.jobs.report() if self.jobs is not None else {}),
        )
        await self.work_in.send(encode(report))

    async def report_load(self) -> None:
        """Load reports (and forced usage sends) every tick, hellos every heartbeat; runs
        until cancelled."""
        every = self.ecfg.load_report_interval_s
        hello_every = max(1, round(self.ecfg.heartbeat_interval_s / every))
        for tick in itertools.count(1):
            await trio.sleep(every)
            self.usage.send(force=True)
            await self.send_load_report()
            if tick % hello_every == 0:
                await self.hello()

    async def heartbeat(self, state: ClusterState, redis: OffLoop) -> None:
        """Write a heartbeat with a TTL every ``heartbeat_interval_s``; runs until cancelled."""
        engine = self.engine
        while True:
            hb = ExecutorHeartbeat(
                executor_id=self.executor_id,
                incarnation=self.incarnation,
                model=engine.model_name,
                device=engine.device,
                free_memory_bytes=_free_memory_bytes(engine.device),
                queue_depth=self.intake.queue_depth(),
                running=engine.num_running(),
                resident_adapters=tuple(self.tiers.resident()) if self.tiers else (),
                max_batch_size=engine.max_batch_size,
                updated_ms=now_ms(),
                training_jobs=len(self.jobs.jobs) if self.jobs is not None else 0,
            )
            try:
                with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                    await redis.run(state.heartbeats.write, hb, self.ecfg.heartbeat_ttl_s)
            except (VajraError, trio.TooSlowError) as exc:
                log.warning("heartbeat not written: %s", exc)
            await trio.sleep(self.ecfg.heartbeat_interval_s)


def tier_report(tiers: AdapterTiers) -> dict[str, Any]:
    """The LoadReport fields placement and prefetch read: residency per tier (digests), slots,
    and the mean measured load time into each tier (see :class:`LoadReport`)."""
    slots = tiers.slots.num_slots

    def mean(name: str) -> float | None:
        s = tiers.stats[name]
        n = sum(s.load_ms.values())
        return s.load_ms_sum / n if n else None

    # Into host memory: validate and pack, plus the disk read when one was timed (a cold load
    # reads from the store instead, timed as the load into the disk).
    host, disk_read = mean("host"), mean("disk")
    if host is not None and disk_read is not None:
        host += disk_read
    load_ms = {"gpu": mean("gpu"), "host": host, "disk": mean("store")}
    return {
        "host_adapters": [d for d, e in tiers.host.entries.items() if e.host is not None],
        "disk_adapters": list(tiers.disk.entries),
        "active_adapters": len(tiers.refs),
        "gpu_slots": slots,
        "gpu_slots_free": max(0, slots - len(tiers.gpu)),
        "tier_load_ms": {k: round(v, 3) for k, v in load_ms.items() if v is not None},
    }


def _free_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
