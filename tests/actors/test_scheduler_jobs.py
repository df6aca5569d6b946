"""Training-job placement in the scheduler: hints, offers, slots, and the actor on sockets.

Test rules: ipc sockets in a temp dir only; every I/O test under ``trio.fail_after``; no timing
assertions (waits are bounded, never measured). Time in :class:`JobPlacement` is passed in.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import trio
import zmq

from tests.actors.inbox import Inbox
from tests.inprocess import inprocess_config
from vajra.actors.scheduler import Scheduler
from vajra.actors.scheduler_jobs import MAX_OFFERS, OFFER_TIMEOUT_S, JobPlacement
from vajra.actors.scheduler_placement import LivePlacement
from vajra.bus.codec import encode
from vajra.bus.messages import ExecutorHello, JobOffer, JobQueued, LoadReport
from vajra.bus.zsocket import open_socket
from vajra.config import VajraConfig

D = "d" * 64


@pytest.fixture
def cfg(tmp_path: Path, valkey_url: str) -> VajraConfig:
    return inprocess_config(tmp_path / "run", valkey_url).replace("training", placement_wait_s=1.0)


def _report(eid: str, **kw: object) -> LoadReport:
    base: dict[str, object] = dict(queue_depth=0, running=0, gpu_slots=4, gpu_slots_free=4)
    base.update(kw)
    return LoadReport(eid, "i1", **base)  # type: ignore[arg-type]


def _rig(cfg: VajraConfig, *executors: str) -> tuple[LivePlacement, JobPlacement]:
    counters: Counter[str] = Counter()
    lp = LivePlacement(cfg, counters)
    for eid in executors:
        lp.joined(eid, 4, 4)
    return lp, JobPlacement(cfg, lp.index, counters)


def _both(lp: LivePlacement, jp: JobPlacement, report: LoadReport) -> None:
    lp.reported(report, dispatched=report.running)
    jp.reported(report)


def test_a_job_goes_where_its_adapter_sits_with_a_free_training_slot(cfg: VajraConfig) -> None:
    lp, jp = _rig(cfg, "a", "b", "c")
    _both(lp, jp, _report("a", training_slots=1))
    _both(lp, jp, _report("b", training_slots=1, running=2))
    _both(lp, jp, _report("c", training_slots=0))  # does not train
    lp._learn(("t1", D))  # a request of t1 for D was seen: its residency counts for t1
    _both(lp, jp, _report("b", training_slots=1, running=2, resident_adapters=[D]))
    jp.queued(JobQueued("j1", "t1", D), 0.0)
    jp.queued(JobQueued("j2", "t1", ""), 0.0)  # fresh: no locality, the least loaded
    assert jp.plan(0.0, 0.0) == [("b", "j1"), ("a", "j2")]
    # Both slots are taken by the offers: a third job waits for a slot.
    jp.queued(JobQueued("j3", "t2", ""), 0.0)
    assert jp.plan(0.1, 100.0) == []
    # b reports j1 running: its hint is done; a's offer of j2 timed out: j2 and j3 go again.
    _both(lp, jp, _report("b", training_slots=1, running=2, training_jobs=["j1"]))
    assert "j1" not in jp.hints
    assert jp.plan(OFFER_TIMEOUT_S + 0.1, 0.0) == [("a", "j2")]
    _both(lp, jp, _report("a", training_slots=2, training_jobs=["j2"]))
    assert jp.plan(OFFER_TIMEOUT_S + 0.2, 0.0) == [("a", "j3")]


def test_hints_are_bounded_checked_and_given_up(cfg: VajraConfig) -> None:
    lp, jp = _rig(cfg, "a")
    _both(lp, jp, _report("a", training_slots=1))
    jp.queued(JobQueued("bad id!", "t1"), 0.0)
    jp.queued(JobQueued("j1", ""), 0.0)
    assert not jp.hints and jp.counters["job_hints_malformed"] == 2
    jp.queued(JobQueued("j1", "t1"), 0.0)
    jp.queued(JobQueued("j1", "t1"), 0.0)  # a repeat is one hint
    now = 0.0
    for _ in range(MAX_OFFERS):  # offered, never seen running (cancelled, or taken elsewhere)
        assert jp.plan(now, 0.0) == [("a", "j1")]
        now += OFFER_TIMEOUT_S + 0.1
    assert jp.plan(now, 0.0) == [] and not jp.hints
    assert jp.counters["job_hints_given_up"] == 1
    # A hint older than its lifetime is dropped even with no slot anywhere.
    _both(lp, jp, _report("a", training_slots=0))
    jp.queued(JobQueued("j2", "t1"), now)
    assert jp.plan(now + jp.ttl_s + 1, 0.0) == [] and not jp.hints
    # A lost executor's offers are free again.
    _both(lp, jp, _report("a", training_slots=1))
    jp.queued(JobQueued("j3", "t1"), now)
    assert jp.plan(now, 0.0) == [("a", "j3")]
    jp.removed("a")
    lp.removed("a")
    assert jp.plan(now, 0.0) == [] and jp.hints["j3"].offered_to == ""


async def test_the_scheduler_offers_queued_jobs_to_the_executor_placement_picks(
    cfg: VajraConfig,
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sched = Scheduler(cfg)
            await nursery.start(sched.run)
            gw = open_socket(ctx, zmq.DEALER, identity=b"gw-test")
            gw.connect(cfg.cluster.scheduler_address)
            execs = {}
            for eid in ("exec-a", "exec-b"):
                s = open_socket(ctx, zmq.DEALER, identity=eid.encode())
                s.connect(cfg.cluster.scheduler_dispatch_address)
                execs[eid] = (s, Inbox(s, routed=False))
                await s.send(encode(ExecutorHello(eid, "i1", "m", 4, 4)))
            a, a_in = execs["exec-a"]
            b, b_in = execs["exec-b"]
            await a.send(encode(_report("exec-a", training_slots=0)))  # does not train
            await b.send(encode(_report("exec-b", training_slots=1)))
            await trio.sleep(0.1)
            # A gateway's hint: exec-b, the only executor with a training slot, gets the offer.
            await gw.send(encode(JobQueued("job-1", "t1")))
            offer = await b_in.next()
            assert isinstance(offer, JobOffer) and offer.job_id == "job-1"
            # exec-a can now train too. An executor's hint (a job handed back while draining):
            # exec-b's one slot is held by its offer, so exec-a gets this one.
            await a.send(encode(_report("exec-a", training_slots=1)))
            await trio.sleep(0.1)
            await b.send(encode(JobQueued("job-2", "t1")))
            offer = await a_in.next()
            assert isinstance(offer, JobOffer) and offer.job_id == "job-2"
            assert sched.counters["job_offers"] == 2
            nursery.cancel_scope.cancel()
    ctx.destroy(linger=0)
