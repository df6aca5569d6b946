"""Executors started on demand: the scheduler's start decisions, its ``CapacityWanted`` on
the events socket, the supervisor side's planner, and the scaler on real sockets and Valkey.

Test rules: ipc sockets in a temp dir only; every I/O test under ``trio.fail_after``; no timing
assertions (waits are bounded, never measured).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import trio
import zmq

from tests.inprocess import inprocess_config
from vajra.actors.actor_processes import ActorProcess
from vajra.actors.base import now_ms, wait_until
from vajra.actors.executor_scaler import ExecutorScaler, ScalePlanner
from vajra.actors.scheduler import Scheduler
from vajra.actors.scheduler_placement import LivePlacement
from vajra.bus.codec import decode, encode, topic
from vajra.bus.messages import (
    CapacityWanted,
    ExecutorHello,
    InferWork,
    LoadReport,
    RequestEvents,
    Sampling,
)
from vajra.bus.zsocket import open_socket
from vajra.config import VajraConfig
from vajra.errors import NoCapacityError
from vajra.state import ClusterState
from vajra.state.heartbeats import ExecutorHeartbeat


@pytest.fixture
def cfg(tmp_path: Path, valkey_url: str) -> VajraConfig:
    return (
        inprocess_config(tmp_path / "run", valkey_url)
        .replace("scheduler", no_capacity_wait_ms=400)
        .replace(
            "provisioning",
            local_executor_start=True,
            max_executors=3,
            executor_start_s=5.0,
            idle_stop_s=2.0,
        )
    )


def _work(rid: str) -> InferWork:
    return InferWork(
        request_id=rid,
        tenant_id="t1",
        prompt="p",
        adapter=None,
        sampling=Sampling(max_tokens=1),
        stream=False,
        deadline_unix_ms=now_ms() + 60_000,
        gateway_id="gw-test",
    )


def _full(lp: LivePlacement, eid: str) -> None:
    lp.reported(LoadReport(eid, "i1", queue_depth=0, running=1), dispatched=1)


def _beat(eid: str, *, running: int = 0, training_jobs: int = 0) -> ExecutorHeartbeat:
    return ExecutorHeartbeat(eid, "inc", "m", "cpu", 0, 0, running, (), 1, 0, training_jobs)


# --- the scheduler's decisions --------------------------------------------------------------


def test_a_request_without_room_asks_for_one_start_at_a_time_up_to_the_max(
    cfg: VajraConfig,
) -> None:
    lp = LivePlacement(cfg, Counter())
    lp.joined("exec-0", 1, 0)
    _full(lp, "exec-0")
    assert lp.hold(b"gw", _work("r1"), [b""], 0, 1e12) is None
    assert lp.take_capacity_wanted() == CapacityWanted(executors=2, waiting=1)
    assert lp.take_capacity_wanted() is None  # published once
    # With local starts a held request waits as long as a start may take, not 400 ms.
    assert lp.waiting[0].until_ms == 5_000
    # A start is under way: the next request waits for it and asks for nothing more.
    assert lp.hold(b"gw", _work("r2"), [b""], 10, 1e12) is None
    assert lp.take_capacity_wanted() is None
    # The new executor joins (and fills up): the next request may ask for a third one.
    lp.joined("exec-1", 1, 0)
    _full(lp, "exec-1")
    assert lp.hold(b"gw", _work("r3"), [b""], 20, 1e12) is None
    assert lp.take_capacity_wanted() == CapacityWanted(executors=3, waiting=3)
    lp.joined("exec-2", 1, 0)
    _full(lp, "exec-2")
    # max_executors (3) serve: no more starts, the request only waits.
    assert lp.hold(b"gw", _work("r4"), [b""], 30, 1e12) is None
    assert lp.take_capacity_wanted() is None


def test_an_executor_that_restarts_does_not_count_as_a_started_one(cfg: VajraConfig) -> None:
    lp = LivePlacement(cfg, Counter())
    lp.joined("exec-0", 1, 0)
    _full(lp, "exec-0")
    assert lp.hold(b"gw", _work("r1"), [b""], 0, 1e12) is None
    assert lp.take_capacity_wanted() is not None
    lp.joined("exec-0", 1, 0)  # a new incarnation of a known executor
    _full(lp, "exec-0")
    assert lp.hold(b"gw", _work("r2"), [b""], 10, 1e12) is None
    assert lp.take_capacity_wanted() is None  # the start asked for is still pending
    # ... until start_s has passed without a join: then it is asked for again.
    assert lp.hold(b"gw", _work("r3"), [b""], 5_010, 1e12) is None
    assert lp.take_capacity_wanted() == CapacityWanted(executors=2, waiting=3)


def test_without_local_starts_nothing_is_asked_for(cfg: VajraConfig) -> None:
    counters: Counter[str] = Counter()
    lp = LivePlacement(cfg.replace("provisioning", local_executor_start=False), counters)
    lp.joined("exec-0", 1, 0)
    _full(lp, "exec-0")
    for i in range(3):
        assert lp.hold(b"gw", _work(f"r{i}"), [b""], i * 1_000, 1e12) is None
    assert lp.take_capacity_wanted() is None
    assert counters["executor_starts_asked"] == 0
    assert [w.until_ms for w in lp.waiting] == [400, 1_400, 2_400]  # the plain wait
    assert isinstance(lp.expired_error(), NoCapacityError)


async def test_the_scheduler_publishes_capacity_wanted_to_subscribers_of_that_kind(
    cfg: VajraConfig,
) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sched = Scheduler(cfg)
            await nursery.start(sched.run)
            sub = open_socket(ctx, zmq.SUB)
            sub.subscribe(topic(CapacityWanted.KIND))
            sub.connect(cfg.cluster.events_address)
            ex = open_socket(ctx, zmq.DEALER, identity=b"exec-0")
            ex.connect(cfg.cluster.scheduler_dispatch_address)
            gw = open_socket(ctx, zmq.DEALER, identity=b"gw-test")
            gw.connect(cfg.cluster.scheduler_address)
            await ex.send(encode(ExecutorHello("exec-0", "i1", "m", 1, 0)))
            await ex.send(encode(LoadReport("exec-0", "i1", queue_depth=0, running=1)))
            await wait_until(lambda: "exec-0" in sched.executors)
            await trio.sleep(0.1)  # the subscription reaches the scheduler's PUB socket
            await gw.send(encode(_work("r1")))  # placed: a RequestEvents the filter drops
            await gw.send(encode(_work("r2")))
            msg = decode(await sub.recv()).message
            assert msg == CapacityWanted(executors=2, waiting=1)
            assert sched.counters["executor_starts_asked"] == 1
            nursery.cancel_scope.cancel()
    ctx.destroy(linger=0)


# --- the supervisor's side ------------------------------------------------------------------


def test_planner_starts_to_the_target_and_never_past_the_max() -> None:
    p = ScalePlanner(base=2, max_executors=4, start_s=10, idle_stop_s=5)
    assert p.wanted(3, 0.0) == [2]
    assert p.wanted(3, 1.0) == []  # a repeat asks for nothing more
    assert p.wanted(9, 2.0) == [3]  # capped at 4 processes
    assert p.wanted(9, 3.0) == []


def test_planner_stops_only_its_own_executors_after_continuous_idleness() -> None:
    p = ScalePlanner(base=1, max_executors=3, start_s=10, idle_stop_s=5)
    assert p.wanted(3, 0.0) == [1, 2]
    base, one, two = _beat("exec-0"), _beat("exec-1"), _beat("exec-2", running=1)
    assert p.observe([base, one, two], 1.0) == []  # exec-1's idle clock starts
    assert p.observe([base, _beat("exec-1", training_jobs=1), two], 4.0) == []  # busy: reset
    assert p.observe([base, one, two], 5.0) == []
    assert p.observe([base, one, two], 9.9) == []
    assert p.observe([base, one, two], 10.0) == [1]
    assert p.stopping == {1}
    # While exec-1 drains its id stays taken and it counts against the max.
    assert p.wanted(3, 11.0) == []
    p.stopped(1)
    assert p.wanted(3, 12.0) == [1]  # the smallest free index again
    # exec-0 (started with the cluster) is idle throughout and never stopped.
    assert 0 not in p.stopping


def test_planner_stops_a_start_that_never_wrote_a_heartbeat() -> None:
    p = ScalePlanner(base=1, max_executors=2, start_s=10, idle_stop_s=0)
    assert p.wanted(2, 0.0) == [1]
    assert p.observe([_beat("exec-0")], 9.0) == []
    assert p.observe([_beat("exec-0")], 10.0) == [1]
    # With idle_stop_s 0 one that came up is never stopped for idleness.
    p.stopped(1)
    assert p.wanted(2, 11.0) == [1]
    for t in (12.0, 100.0, 10_000.0):
        assert p.observe([_beat("exec-0"), _beat("exec-1")], t) == []


def test_planner_rejects_negative_limits() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        ScalePlanner(base=1, max_executors=-1, start_s=1, idle_stop_s=1)


async def test_scaler_starts_on_the_message_and_retires_an_idle_executor(
    cfg: VajraConfig, tmp_path: Path
) -> None:
    spawned: list[ActorProcess] = []
    retired: list[str] = []

    async def retire(name: str) -> None:
        retired.append(name)

    scaler = ExecutorScaler(
        cfg, tmp_path / "cluster.toml", base_devices=[None], spawn=spawned.append, retire=retire
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = open_socket(ctx, zmq.PUB)
    pub.bind(cfg.cluster.events_address)
    state = ClusterState(cfg.cluster.redis_url)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(scaler.run)
                # Until the subscription is through, messages are lost: repeat (idempotent).
                while not spawned:
                    pub.send_nowait(encode(RequestEvents([])))
                    pub.send_nowait([topic(CapacityWanted.KIND) + b"junk", b"x"])
                    pub.send_nowait(encode(CapacityWanted(executors=2)))
                    await trio.sleep(0.05)
                await trio.sleep(0.2)
                assert [a.name for a in spawned] == ["executor-1"]
                argv = spawned[0].argv
                assert argv[argv.index("--executor-id") + 1] == "exec-1"
                assert "--metrics-port" not in argv  # cluster.metrics_port is 0
                assert scaler.counters["malformed"] >= 1
                # exec-1 comes up busy with a training job, then goes idle: retired.
                state.heartbeats.write(_beat("exec-1", training_jobs=1), 30)
                await trio.sleep(2.5)
                assert retired == []
                state.heartbeats.write(_beat("exec-1"), 30)
                await wait_until(lambda: retired == ["executor-1"])
                assert scaler.planner.stopping == set()  # retire returned: the id is free
                nursery.cancel_scope.cancel()
    finally:
        state.close()
        pub.close()
        ctx.destroy(linger=0)
