"""Executor heartbeats against a real embedded Valkey (see conftest.py for the rules)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import redis

from vajra.errors import InvalidRequest
from vajra.state import ClusterState, ExecutorHeartbeat, keys


def _hb(executor_id: str = "exec-0", **changes: object) -> ExecutorHeartbeat:
    hb = ExecutorHeartbeat(
        executor_id=executor_id,
        incarnation="inc-1",
        model="tiny-llama",
        device="cuda:0",
        free_memory_bytes=40 * 2**30,
        queue_depth=3,
        running=2,
        resident_adapters=("a1", "a2"),
        max_batch_size=32,
        updated_ms=1_700_000_000_000,
    )
    return replace(hb, **changes)  # type: ignore[arg-type]


def test_round_trip(state: ClusterState) -> None:
    a, b = _hb("exec-b"), _hb("exec-a", resident_adapters=(), device="cpu")
    state.heartbeats.write(a, ttl_s=30)
    state.heartbeats.write(b, ttl_s=30)
    assert state.heartbeats.list() == [b, a]


def test_training_jobs_round_trip_and_default_to_zero_when_absent(
    state: ClusterState, raw: redis.Redis[str]
) -> None:
    state.heartbeats.write(_hb("exec-j", training_jobs=2), ttl_s=30)
    assert [hb.training_jobs for hb in state.heartbeats.list()] == [2]
    raw.hdel(keys.executor("exec-j"), "training_jobs")  # as an older executor wrote it
    assert [hb.training_jobs for hb in state.heartbeats.list()] == [0]


def test_rewrite_replaces(state: ClusterState) -> None:
    state.heartbeats.write(_hb(), ttl_s=30)
    newer = _hb(queue_depth=0, resident_adapters=("a3",), incarnation="inc-2")
    state.heartbeats.write(newer, ttl_s=30)
    assert state.heartbeats.list() == [newer]


def test_expired_heartbeat_disappears(state: ClusterState, raw: redis.Redis[str]) -> None:
    state.heartbeats.write(_hb("short"), ttl_s=1)
    state.heartbeats.write(_hb("long"), ttl_s=60)
    assert 0 < raw.pttl(keys.executor("short")) <= 1000

    deadline = time.monotonic() + 5.0
    while True:
        live = [hb.executor_id for hb in state.heartbeats.list()]
        if live == ["long"]:
            break
        assert live == ["long", "short"]
        assert time.monotonic() < deadline, "heartbeat did not expire within 5 s"
        time.sleep(0.1)
    assert raw.smembers(keys.executors()) == {"long"}


def test_malformed_heartbeat_is_skipped(state: ClusterState, raw: redis.Redis[str]) -> None:
    state.heartbeats.write(_hb("good"), ttl_s=30)
    raw.hset(keys.executor("bad"), mapping={"incarnation": "x", "queue_depth": "many"})
    raw.sadd(keys.executors(), "bad")
    assert [hb.executor_id for hb in state.heartbeats.list()] == ["good"]


@pytest.mark.parametrize("ttl_s", [0, -1, float("nan"), float("inf")])
def test_bad_ttl_rejected(state: ClusterState, ttl_s: float) -> None:
    with pytest.raises(InvalidRequest) as info:
        state.heartbeats.write(_hb(), ttl_s=ttl_s)
    assert info.value.field == "ttl_s"
    assert state.heartbeats.list() == []
