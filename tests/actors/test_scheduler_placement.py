"""Live placement: the scheduler and predictor actors on real sockets, executors played by
raw sockets (so what each one reports is exact).

Test rules: ipc sockets in a temp dir only; every I/O test under ``trio.fail_after``; no timing
assertions (waits are bounded, never measured).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import trio
import zmq

from tests.actors.inbox import Inbox
from tests.inprocess import inprocess_config
from vajra.actors.base import now_ms, wait_until
from vajra.actors.predictor import Predictor, command_for, make_predictor
from vajra.actors.scheduler import Scheduler
from vajra.actors.scheduler_placement import LivePlacement
from vajra.bus.codec import encode
from vajra.bus.messages import (
    AdapterForecasts,
    AdapterTierCommand,
    ErrorReply,
    ExecutorHello,
    GatewayHello,
    InferWork,
    LoadReport,
    RequestEvent,
    Sampling,
)
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import ConfigError, VajraConfig
from vajra.errors import NoCapacityError, UnavailableError
from vajra.policies.placement import Tier
from vajra.policies.prefetch import TierCommand
from vajra.state import ClusterState


@pytest.fixture
def cfg(tmp_path: Path, valkey_url: str) -> VajraConfig:
    return inprocess_config(tmp_path / "run", valkey_url).replace(
        "scheduler", executor_timeout_s=0.4, no_capacity_wait_ms=400
    )


def _work(
    rid: str, tenant: str = "t1", digest: str | None = "d1", stream: bool = False
) -> InferWork:
    return InferWork(
        request_id=rid,
        tenant_id=tenant,
        prompt="p",
        adapter="a" if digest else None,
        sampling=Sampling(max_tokens=1),
        stream=stream,
        deadline_unix_ms=now_ms() + 60_000,
        gateway_id="gw-test",
        adapter_digest=digest,
        adapter_object_key=f"objects/{digest}" if digest else None,
    )


def _report(eid: str, inc: str = "i1", **kw: object) -> LoadReport:
    base: dict[str, object] = dict(queue_depth=0, running=0, gpu_slots=4, gpu_slots_free=4)
    base.update(kw)
    return LoadReport(eid, inc, **base)  # type: ignore[arg-type]


# --- LivePlacement without sockets ---------------------------------------------------------


def test_residency_reports_steer_placement_per_tenant(cfg: VajraConfig) -> None:
    lp = LivePlacement(cfg, Counter())
    lp.joined("a", 4, 4)
    lp.joined("b", 4, 4)
    lp.reported(_report("a", running=1), dispatched=1)
    lp.reported(_report("b", resident_adapters=["d1"], running=2), dispatched=2)
    # d1 is in b's GPU memory: t1's request for it goes there despite more load.
    assert lp.choose(_work("r1"), 0) == "b"
    # Base-model requests and other digests: load decides.
    assert lp.choose(_work("r2", digest=None), 0) == "a"
    assert lp.choose(_work("r3", digest="d9"), 0) == "a"
    # The digest moves to disk on b and into a's GPU memory.
    lp.reported(_report("b", disk_adapters=["d1"], running=2), dispatched=2)
    lp.reported(_report("a", resident_adapters=["d1"], running=1), dispatched=1)
    assert lp.choose(_work("r4"), 0) == "a"
    assert lp.index.holders(("t1", "d1")) == {"a": Tier.GPU, "b": Tier.DISK}
    # A second tenant sending the same digest learns the same residency.
    assert lp.choose(_work("r5", tenant="t2"), 0) == "a"
    assert lp.index.holders(("t2", "d1")) == {"a": Tier.GPU, "b": Tier.DISK}
    lp.removed("a")
    assert lp.index.holders(("t1", "d1")) == {"b": Tier.DISK}
    assert lp.tier_load_ms() == {}


def test_full_executors_hold_then_refuse_and_route_tier_commands(cfg: VajraConfig) -> None:
    lp = LivePlacement(cfg, Counter())
    work = _work("r1")
    assert isinstance(lp.hold(b"gw", work, [b""], 0, 1e12), UnavailableError)
    lp.joined("a", 1, 0)
    lp.reported(_report("a", running=1, resident_adapters=["d1"]), dispatched=1)
    assert lp.choose(work, 0) is None  # full by its own report
    assert lp.hold(b"gw", work, [b""], 0, 1e12) is None
    assert lp.hold(b"gw", _work("r2"), [b""], 100, 300) is None
    assert lp.waiting[1].until_ms == 300  # its deadline comes before the wait's end
    assert lp.cancel_held(["r2", "nope"]) == {"r2"}
    assert [w.until_ms for w in lp.take_waiting()] == [400]
    assert isinstance(lp.expired_error(), NoCapacityError)
    promote = AdapterTierCommand("", "d1", "objects/d1", "gpu", "promote", tenant_id="t1")
    assert lp.route_tier_command(promote, 0) == []  # no room anywhere
    lp.reported(_report("a", resident_adapters=["d1"]), dispatched=0)
    assert lp.route_tier_command(promote, 0) == ["a"]
    demote = AdapterTierCommand("", "d1", "objects/d1", "host", "demote", tenant_id="t1")
    assert lp.route_tier_command(demote, 0) == ["a"]
    named = AdapterTierCommand("zz", "d1", "objects/d1", "host", "demote")
    assert lp.route_tier_command(named, 0) == []
    bad = AdapterTierCommand("", "d1", "objects/d1", "nowhere", "demote")
    assert lp.route_tier_command(bad, 0) == []


def test_predictor_kinds_and_wire_commands(cfg: VajraConfig) -> None:
    for kind in ("histogram", "gap", "ewma", "keepalive", "lru"):
        assert make_predictor(cfg.replace("predictor", kind=kind)) is not None
    with pytest.raises(ConfigError):
        make_predictor(cfg.replace("predictor", kind="oracle"))
    demote = command_for(TierCommand(("t", "d"), None, Tier.DISK, "demote", "idle"), "obj")
    assert (demote.executor_id, demote.tier, demote.action, demote.tenant_id) == (
        "",
        "host",
        "demote",
        "t",
    )
    promote = command_for(TierCommand(("t", "d"), "e1", Tier.GPU, "promote", "soon"), "obj")
    assert (promote.executor_id, promote.tier, promote.action) == ("e1", "gpu", "promote")


def test_predictor_keys_by_tenant_and_digest_and_plans(cfg: VajraConfig, valkey_url: str) -> None:
    cfg = cfg.replace("predictor", kind="keepalive", keepalive_ms=1_000).replace(
        "policies", prefetch_lookahead_ms=100
    )
    with ClusterState(valkey_url) as state:
        p = Predictor(cfg, state)
        try:
            for tenant in ("t1", "t2"):
                p.record(RequestEvent("r", tenant, "same-name", "e", 10_000, 1, "d1", "obj/d1"))
            p.record(RequestEvent("r", "t1", None, "e", 10_000))  # base model: not prefetched
            assert set(p.history) == {("t1", "d1"), ("t2", "d1"), ("t1", "")}
            assert p.plan(10_500) == []  # inside the keep-alive window
            cmds = p.plan(11_001)
            # Demoted to host memory: the wire command drops it from the GPU tier.
            assert {(c.tenant_id, c.action, c.tier) for c in cmds} == {
                ("t1", "demote", "gpu"),
                ("t2", "demote", "gpu"),
            }
            assert p.residency[("t1", "d1")] == Tier.HOST
            p.observe_load_times({"gpu": 3.0, "bogus": 1.0, "disk": -5.0})
            assert p.prefetcher.load.measured[Tier.GPU] == 1
        finally:
            p.events.close()
            p.scheduler.close()
            p._ctx.term()


def test_predictor_plans_with_the_sizes_requests_carry(cfg: VajraConfig, valkey_url: str) -> None:
    with ClusterState(valkey_url) as state:
        p = Predictor(cfg, state)
        try:
            big, small = 64 << 20, 16 << 20
            p.record(RequestEvent("r", "t1", "a", "e", 1_000, 1, "d1", "obj/d1", big))
            p.record(RequestEvent("r", "t1", "b", "e", 1_000, 1, "d2", "obj/d2", small))
            p.record(RequestEvent("r", "t1", "c", "e", 1_000, 1, "d3", "obj/d3"))  # unsized
            assert p.prefetcher.sizes[("t1", "d1")] == big
            assert p.prefetcher.sizes[("t1", "d2")] == small
            assert ("t1", "d3") not in p.prefetcher.sizes
            # A mean measured load time is the time for the mean size requested (40 MiB):
            # a 64 MiB adapter is planned to take 1.6 times that, a 16 MiB one 0.4 times.
            p.observe_load_times({"gpu": 10.0})
            load = p.prefetcher.load
            assert load.load_ms(Tier.GPU, big) == pytest.approx(16.0)
            assert load.load_ms(Tier.GPU, small) == pytest.approx(4.0)
        finally:
            p.events.close()
            p.scheduler.close()
            p._ctx.term()


# --- the actors on sockets -----------------------------------------------------------------


def _executor(
    ctx: zmq.Context[zmq.Socket[bytes]], cfg: VajraConfig, eid: str
) -> tuple[ZSocket, Inbox]:
    s = open_socket(ctx, zmq.DEALER, identity=eid.encode())
    s.connect(cfg.cluster.scheduler_dispatch_address)
    return s, Inbox(s, routed=False)


async def test_scheduler_places_by_residency_holds_for_room_and_redispatches_once(
    cfg: VajraConfig,
) -> None:
    # Long enough for the steps before exec-b is meant to fall silent, on a loaded machine.
    cfg = cfg.replace("scheduler", executor_timeout_s=3.0)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sched = Scheduler(cfg)
            await nursery.start(sched.run)
            gw = open_socket(ctx, zmq.DEALER, identity=b"gw-test")
            gw.connect(cfg.cluster.scheduler_address)
            gw_in = Inbox(gw, routed=False)
            a, a_in = _executor(ctx, cfg, "exec-a")
            b, b_in = _executor(ctx, cfg, "exec-b")
            await a.send(encode(ExecutorHello("exec-a", "i1", "m", 1, 0)))
            await b.send(encode(ExecutorHello("exec-b", "i1", "m", 1, 0)))
            await b.send(encode(_report("exec-b", resident_adapters=["d1"])))
            await a.send(encode(_report("exec-a")))
            # until both hellos and exec-b's residency report are in (white box: before a
            # placement names d1's tenant, the residency is kept by digest only)
            await wait_until(
                lambda: "exec-a" in sched.executors and "d1" in sched.placement._holders
            )
            # d1 sits in exec-b's GPU memory: the request goes there.
            await gw.send(encode(_work("r1")))
            assert (await b_in.next()).request_id == "r1"  # type: ignore[attr-defined]
            # exec-b is now full (batch 1, no queue): the next d1 request goes to exec-a.
            await b.send(encode(_report("exec-b", running=1, resident_adapters=["d1"])))
            await wait_until(lambda: sched.executors["exec-b"].reported_load == 1)
            await gw.send(encode(_work("r2")))
            assert (await a_in.next()).request_id == "r2"  # type: ignore[attr-defined]
            await a.send(encode(_report("exec-a", running=1)))
            await wait_until(lambda: sched.executors["exec-a"].reported_load == 1)
            # Both full: r3 is held, then placed when exec-a reports r2 finished.
            await gw.send(encode(_work("r3")))
            await wait_until(lambda: sched.counters["held_for_room"] == 1)
            await a.send(encode(_report("exec-a", finished_ids=["r2"])))
            assert (await a_in.next()).request_id == "r3"  # type: ignore[attr-defined]
            # Both full again: r4 waits no_capacity_wait_ms, then is refused as no_capacity.
            await a.send(encode(_report("exec-a", running=1)))
            await wait_until(lambda: sched.executors["exec-a"].reported_load == 1)
            await gw.send(encode(_work("r4")))
            reply = await gw_in.next()
            assert isinstance(reply, ErrorReply) and reply.request_id == "r4"
            assert reply.code == "no_capacity" and reply.retriable
            # exec-b falls silent (exec-a keeps reporting): r1 (not streaming) is dispatched
            # again, once, to exec-a, which has room once r3 finished.
            await a.send(encode(_report("exec-a", finished_ids=["r3"])))
            with trio.fail_after(10):
                while "exec-b" in sched.executors:  # a hello keeps exec-a, not exec-b, alive
                    await a.send(encode(ExecutorHello("exec-a", "i1", "m", 1, 0)))
                    await trio.sleep(0.05)
            assert (await a_in.next()).request_id == "r1"  # type: ignore[attr-defined]
            assert sched.counters["requests_redispatched"] == 1
            nursery.cancel_scope.cancel()
    ctx.destroy(linger=0)


async def test_predictor_tier_commands_reach_the_executor_through_the_scheduler(
    cfg: VajraConfig, valkey_url: str
) -> None:
    cfg = cfg.replace("predictor", kind="keepalive", keepalive_ms=200, plan_interval_s=0.05)
    # exec-a reports only while the test places work: a long timeout keeps it registered on a
    # loaded machine until the demote arrives.
    cfg = cfg.replace("scheduler", executor_timeout_s=3.0)
    cfg = cfg.replace("policies", prefetch_lookahead_ms=100)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with ClusterState(valkey_url) as state, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            sched = Scheduler(cfg)
            await nursery.start(sched.run)
            predictor = Predictor(cfg, state)
            await nursery.start(predictor.run)
            gw = open_socket(ctx, zmq.DEALER, identity=b"gw-test")
            gw.connect(cfg.cluster.scheduler_address)
            ex, ex_in = _executor(ctx, cfg, "exec-a")
            ex_in.skip = (GatewayHello, AdapterForecasts)  # counted below
            while "exec-a" not in sched.executors:  # until the scheduler registers exec-a
                await ex.send(encode(ExecutorHello("exec-a", "i1", "m", 4, 4)))
                await trio.sleep(0.02)
            # PUB/SUB drops what is published before the predictor's subscription is joined (a
            # loaded machine takes a while): place d7 requests until the predictor has seen one.
            n = 0
            while ("t1", "d7") not in predictor.history:
                n += 1
                await gw.send(encode(_work(f"r{n}", digest="d7")))
                assert (await ex_in.next()).request_id == f"r{n}"  # type: ignore[attr-defined]
                done = [f"r{i}" for i in range(1, n + 1)]
                await ex.send(
                    encode(_report("exec-a", finished_ids=done, resident_adapters=["d7"]))
                )
                await trio.sleep(0.1)
            # Past the keep-alive, the predictor demotes d7 to host memory; the scheduler sends it to the
            # executor holding it.
            cmd = await ex_in.next()
            assert isinstance(cmd, AdapterTierCommand)
            assert (cmd.adapter_digest, cmd.action, cmd.tier) == ("d7", "demote", "gpu")
            assert cmd.executor_id == "exec-a" and cmd.tenant_id == "t1"
            assert predictor.counters["tier_demote"] == 1
            # The predictor's forecasts for d7 reached the scheduler too (cut per executor).
            with trio.fail_after(10):
                await wait_until(lambda: sched.counters["forecasts"] > 0)
            nursery.cancel_scope.cancel()
    ctx.destroy(linger=0)
