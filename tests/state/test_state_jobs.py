"""Training jobs in the cluster state: every transition, races, isolation, leases, resume.

Rules: loopback only; the session's real Valkey, FLUSHDB before each test (``raw``); races
run real threads against the real server; no fakes. Lease expiry is driven by passing
``now_ms`` to :meth:`Jobs.expire`, never by sleeping.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import pytest
import redis

from vajra.errors import InternalError, InvalidRequest, NotFoundError, QuotaExceeded
from vajra.state import ClusterState, keys
from vajra.state.fields import now_ms
from vajra.state.jobs import EXECUTOR_LOST, JobRecord, Jobs, new_job_id

T1, T2 = "t_aaaa", "t_bbbb"
BASE = "tiny-llama"
HOUR_MS = 3_600_000


def _rec(tenant: str = T1, *, job_id: str | None = None, base: str = BASE) -> JobRecord:
    return JobRecord(
        job_id=job_id or new_job_id(),
        tenant_id=tenant,
        adapter="mem",
        base_model=base,
        from_version=None,
        params={"epochs": 2, "rank": 4, "target_modules": ["q_proj"]},
        dataset_key=f"datasets/{tenant}/{'0' * 64}.jsonl",
        dataset_digest="0" * 64,
        total_steps=10,
    )


@pytest.fixture
def jobs(state: ClusterState) -> Jobs:
    return state.jobs


def test_create_get_list_round_trip(jobs: Jobs) -> None:
    a = jobs.create(_rec())
    b = jobs.create(_rec())
    assert a.status == "queued" and a.created_ms > 0 and a.attempt == 1
    got = jobs.get(T1, a.job_id)
    assert got == a
    assert got.params == {"epochs": 2, "rank": 4, "target_modules": ["q_proj"]}
    listed = jobs.list(T1)
    assert {r.job_id for r in listed} == {a.job_id, b.job_id}
    assert jobs.list(T1, limit=1)[0].created_ms >= jobs.list(T1)[-1].created_ms
    with pytest.raises(InvalidRequest):
        jobs.create(a)  # the id is taken
    with pytest.raises(InvalidRequest) as e:
        jobs.list(T1, limit=0)
    assert e.value.field == "limit"


def test_other_tenant_sees_not_found_with_the_same_message(jobs: Jobs) -> None:
    a = jobs.create(_rec(T1))
    with pytest.raises(NotFoundError) as theirs:
        jobs.get(T2, a.job_id)
    with pytest.raises(NotFoundError) as missing:
        jobs.get(T2, "j_" + "f" * 32)
    assert str(theirs.value).replace(a.job_id, "X") == str(missing.value).replace(
        "j_" + "f" * 32, "X"
    )
    for call in (jobs.request_cancel, jobs.resume):
        with pytest.raises(NotFoundError):
            call(T2, a.job_id)
    assert jobs.list(T2) == []
    assert jobs.get(T1, a.job_id).status == "queued"
    with pytest.raises(NotFoundError):
        jobs.get(T1, "../../etc")  # hostile ids answer not found, never touch a key


def test_claim_progress_checkpoint_finish(jobs: Jobs, raw: redis.Redis[str]) -> None:
    a = jobs.create(_rec())
    assert jobs.claim("ex-1", "other-model", 1000) is None
    claimed = jobs.claim("ex-1", BASE, 10_000)
    assert claimed is not None and claimed.job_id == a.job_id
    assert claimed.status == "running" and claimed.executor_id == "ex-1"
    assert claimed.started_ms > 0
    assert jobs.claim("ex-2", BASE, 10_000) is None
    assert jobs.running_on("ex-1") == [a.job_id]
    assert jobs.renew(a.job_id, "ex-1", 10_000) is True
    assert jobs.renew(a.job_id, "ex-2", 10_000) is False
    jobs.progress(
        a.job_id, "ex-1", step=3, epoch=1, loss=1.25, tokens=300, gradients=4096, cost_usd=0.5
    )
    jobs.progress(  # another executor's report changes nothing
        a.job_id, "ex-2", step=9, epoch=1, loss=9.0, tokens=1, gradients=1, cost_usd=9.0
    )
    jobs.checkpointed(a.job_id, "ex-1", key="checkpoints/t_aaaa/j/3", step=3)
    got = jobs.get(T1, a.job_id)
    assert (got.step, got.epoch, got.loss, got.tokens, got.gradients, got.cost_usd) == (
        3,
        1,
        1.25,
        300,
        4096,
        0.5,
    )
    assert (got.checkpoint_key, got.checkpoint_step) == ("checkpoints/t_aaaa/j/3", 3)
    with pytest.raises(InvalidRequest):
        jobs.progress(
            a.job_id, "ex-1", step=-1, epoch=0, loss=0.0, tokens=0, gradients=0, cost_usd=0
        )
    with pytest.raises(InvalidRequest):
        jobs.progress(
            a.job_id,
            "ex-1",
            step=1,
            epoch=0,
            loss=float("nan"),
            tokens=0,
            gradients=0,
            cost_usd=0,
        )
    with pytest.raises(InvalidRequest):
        jobs.finish(a.job_id, "ex-1", "running")  # type: ignore[arg-type]
    done = jobs.finish(a.job_id, "ex-1", "succeeded", result_version=7)
    assert done.status == "succeeded" and done.result_version == 7 and done.finished_ms > 0
    assert jobs.running_on("ex-1") == []
    assert raw.zcard(keys.jobs_running()) == 0
    assert raw.scard(keys.jobs_active(T1)) == 0
    # A late finish by anyone leaves the record alone.
    again = jobs.finish(a.job_id, "ex-1", "failed", error="late")
    assert again.status == "succeeded" and again.error == ""
    assert jobs.renew(a.job_id, "ex-1", 1000) is False


def _race(*calls: Callable[[], object]) -> list[object]:
    """Run ``calls`` in threads released together; their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    return results


def test_two_executors_racing_for_one_job_one_wins(state: ClusterState) -> None:
    for _ in range(20):
        a = state.jobs.create(_rec())
        results = _race(
            *(functools.partial(state.jobs.claim, f"ex-{i}", BASE, 10_000) for i in range(4))
        )
        won = [r for r in results if isinstance(r, JobRecord)]
        assert len(won) == 1 and won[0].job_id == a.job_id
        state.jobs.finish(a.job_id, won[0].executor_id, "succeeded")


def test_cancel_queued_running_and_during_claim(jobs: Jobs, raw: redis.Redis[str]) -> None:
    a = jobs.create(_rec())
    c = jobs.request_cancel(T1, a.job_id)
    assert c.status == "cancelled" and c.finished_ms > 0
    assert jobs.claim("ex-1", BASE, 1000) is None  # a cancelled job is never claimed
    assert raw.llen(keys.jobs_queue(BASE)) == 0
    assert jobs.request_cancel(T1, a.job_id).status == "cancelled"  # idempotent

    b = jobs.create(_rec())
    assert jobs.claim("ex-1", BASE, 10_000) is not None
    flagged = jobs.request_cancel(T1, b.job_id)
    assert flagged.status == "running" and flagged.cancel_requested
    assert jobs.renew(b.job_id, "ex-1", 10_000) is False
    out = jobs.finish(b.job_id, "ex-1", "cancelled", error="cancelled by the tenant")
    assert out.status == "cancelled" and raw.scard(keys.jobs_active(T1)) == 0


def test_cancel_racing_claim_leaves_one_consistent_outcome(state: ClusterState) -> None:
    for _ in range(20):
        a = state.jobs.create(_rec())
        claimed, _ = _race(
            functools.partial(state.jobs.claim, "ex-1", BASE, 10_000),
            functools.partial(state.jobs.request_cancel, T1, a.job_id),
        )
        rec = state.jobs.get(T1, a.job_id)
        if claimed is None:
            assert rec.status == "cancelled"
        else:
            assert rec.status == "running" and rec.cancel_requested
            assert state.jobs.renew(a.job_id, "ex-1", 1000) is False
            state.jobs.finish(a.job_id, "ex-1", "cancelled")
        assert state.jobs.get(T1, a.job_id).status == "cancelled"


def test_expiry_fails_lost_jobs_keeping_the_checkpoint_then_resume(
    jobs: Jobs, raw: redis.Redis[str]
) -> None:
    a = jobs.create(_rec())
    b = jobs.create(_rec())
    assert jobs.claim("ex-1", BASE, 5_000) is not None
    assert jobs.claim("ex-2", BASE, 5 * HOUR_MS) is not None
    first = jobs.running_on("ex-1")[0]
    jobs.checkpointed(first, "ex-1", key="checkpoints/t_aaaa/x/4", step=4)
    assert jobs.expire(now_ms() - 60_000) == []  # nothing has passed yet
    assert jobs.expire(now_ms() + 60_000) == [first]
    lost = jobs.get(T1, first)
    assert lost.status == "failed" and lost.error == EXECUTOR_LOST
    assert (lost.checkpoint_key, lost.checkpoint_step) == ("checkpoints/t_aaaa/x/4", 4)
    assert jobs.running_on("ex-1") == []
    assert jobs.renew(first, "ex-1", 1000) is False
    # The lost executor's late finish does not overwrite the verdict.
    assert jobs.finish(first, "ex-1", "succeeded", result_version=3).status == "failed"

    resumed = jobs.resume(T1, first)
    assert resumed.status == "queued" and resumed.attempt == 2 and resumed.error == ""
    assert resumed.checkpoint_step == 4 and resumed.executor_id == ""
    again = jobs.claim("ex-3", BASE, 10_000)
    assert again is not None and again.job_id == first and again.checkpoint_step == 4
    assert again.started_ms == lost.started_ms  # kept from the first attempt
    with pytest.raises(InvalidRequest) as e:
        jobs.resume(T1, first)  # running
    assert e.value.field == "status"
    other = b.job_id if first == a.job_id else a.job_id
    assert jobs.get(T1, other).status == "running"


def test_requeue_hands_a_running_job_back_to_the_front_of_the_queue(
    jobs: Jobs, raw: redis.Redis[str]
) -> None:
    a = jobs.create(_rec())
    b = jobs.create(_rec())
    assert jobs.claim("ex-1", BASE, 5_000) is not None  # a, the oldest
    jobs.checkpointed(a.job_id, "ex-1", key="checkpoints/t_aaaa/a/6", step=6)
    assert jobs.requeue(a.job_id, "ex-2") is False  # not running there: nothing changes
    assert jobs.requeue(a.job_id, "ex-1") is True
    back = jobs.get(T1, a.job_id)
    assert back.status == "queued" and back.attempt == 2 and back.executor_id == ""
    assert (back.checkpoint_key, back.checkpoint_step) == ("checkpoints/t_aaaa/a/6", 6)
    assert jobs.running_on("ex-1") == [] and raw.zscore(keys.jobs_running(), a.job_id) is None
    assert jobs.active_count(T1) == 2
    assert jobs.requeue(a.job_id, "ex-1") is False  # twice: once only
    # Claimed next, before b which was queued earlier, from its checkpoint.
    again = jobs.claim("ex-2", BASE, 5_000)
    assert again is not None and again.job_id == a.job_id and again.checkpoint_step == 6
    assert again.started_ms == jobs.get(T1, a.job_id).started_ms
    nxt = jobs.claim("ex-2", BASE, 5_000)
    assert nxt is not None and nxt.job_id == b.job_id
    # A running job whose tenant asked to cancel it is not handed back.
    jobs.request_cancel(T1, b.job_id)
    assert jobs.requeue(b.job_id, "ex-2") is False
    assert jobs.get(T1, b.job_id).status == "running"
    with pytest.raises(InvalidRequest):
        jobs.requeue("not an id", "ex-2")


def test_resume_refuses_without_checkpoint_or_when_succeeded(jobs: Jobs) -> None:
    a = jobs.create(_rec())
    jobs.request_cancel(T1, a.job_id)
    with pytest.raises(InvalidRequest) as e:
        jobs.resume(T1, a.job_id)
    assert e.value.field == "checkpoint" and "no checkpoint" in e.value.message
    b = jobs.create(_rec())
    assert jobs.claim("ex-1", BASE, 1000) is not None
    jobs.checkpointed(b.job_id, "ex-1", key="k", step=1)
    jobs.finish(b.job_id, "ex-1", "succeeded", result_version=2)
    with pytest.raises(InvalidRequest) as e:
        jobs.resume(T1, b.job_id)
    assert "succeeded" in e.value.message


def test_per_tenant_active_limit(jobs: Jobs) -> None:
    a = jobs.create(_rec(), max_active=2)
    jobs.create(_rec(), max_active=2)
    with pytest.raises(QuotaExceeded):
        jobs.create(_rec(), max_active=2)
    jobs.create(_rec(T2), max_active=2)  # another tenant is not counted
    jobs.request_cancel(T1, a.job_id)
    jobs.create(_rec(), max_active=2)
    assert len(jobs.list(T1)) == 3


def test_index_is_bounded_dropping_oldest_finished(state: ClusterState) -> None:
    small = Jobs(state._conn, index_limit=3)
    made = []
    for i in range(3):
        rec = small.create(_rec(), max_active=0)
        made.append(rec)
        if i < 2:
            small.request_cancel(T1, rec.job_id)
    newest = small.create(_rec())
    ids = {r.job_id for r in small.list(T1)}
    assert made[0].job_id not in ids and newest.job_id in ids and len(ids) == 3
    with pytest.raises(NotFoundError):
        small.get(T1, made[0].job_id)  # forgotten with its record
    small.create(_rec())  # the two left are active or newer: none is dropped then
    assert len(small.list(T1)) >= 3


def test_queues_are_per_base_model_and_fifo(jobs: Jobs) -> None:
    a = jobs.create(_rec(base="m1"))
    b = jobs.create(_rec(base="m1"))
    c = jobs.create(_rec(base="m2"))
    first = jobs.claim("ex-1", "m1", 1000)
    second = jobs.claim("ex-1", "m1", 1000)
    assert first is not None and second is not None
    assert [first.job_id, second.job_id] == [a.job_id, b.job_id]
    got = jobs.claim("ex-2", "m2", 1000)
    assert got is not None and got.job_id == c.job_id


def test_claim_by_offer_and_after_the_placement_wait(jobs: Jobs) -> None:
    a = jobs.create(_rec())
    b = jobs.create(_rec())
    assert a.queued_ms == a.created_ms > 0
    # Young jobs are left to placement: no claim without an offer.
    assert jobs.claim("ex-1", BASE, 1000, placement_wait_ms=HOUR_MS) is None
    # An offer claims that job, out of queue order.
    got = jobs.claim("ex-1", BASE, 1000, job_id=b.job_id, placement_wait_ms=HOUR_MS)
    assert got is not None and got.job_id == b.job_id and got.executor_id == "ex-1"
    assert jobs.claim("ex-2", BASE, 1000, job_id=b.job_id) is None  # taken already
    assert jobs.claim("ex-2", BASE, 1000, job_id="no-such-job") is None
    assert jobs.claim("ex-2", BASE, 1000, job_id="bad id!") is None
    # Once waited long enough (here: no wait), any executor takes the oldest.
    got = jobs.claim("ex-2", BASE, 1000, placement_wait_ms=0)
    assert got is not None and got.job_id == a.job_id
    assert jobs.claim("ex-2", BASE, 1000) is None
    # A cancelled job is never claimed, by offer or not, and leaves the queue.
    c = jobs.create(_rec())
    jobs.request_cancel(T1, c.job_id)
    assert jobs.claim("ex-1", BASE, 1000, job_id=c.job_id) is None
    # A job handed back is queued afresh (its queued_ms moves on).
    jobs.checkpointed(a.job_id, "ex-2", key="k", step=1)
    assert jobs.requeue(a.job_id, "ex-2")
    assert jobs.get(T1, a.job_id).queued_ms >= a.queued_ms
    with pytest.raises(InvalidRequest):
        jobs.claim("ex-1", BASE, 1000, placement_wait_ms=-1)


def test_bad_arguments_are_refused_before_writing(jobs: Jobs, raw: redis.Redis[str]) -> None:
    with pytest.raises(InvalidRequest):
        jobs.create(_rec(job_id="bad id with spaces"))
    with pytest.raises(InvalidRequest):
        jobs.create(_rec(tenant="t:evil"))
    with pytest.raises(InvalidRequest):
        jobs.create(_rec(base=""))
    with pytest.raises(InvalidRequest):
        jobs.claim("ex 1", BASE, 1000)
    with pytest.raises(InvalidRequest):
        jobs.claim("ex-1", BASE, 0)
    assert raw.dbsize() == 0


def test_damaged_record_is_an_internal_error(jobs: Jobs, raw: redis.Redis[str]) -> None:
    a = jobs.create(_rec())
    raw.hset(keys.job(a.job_id), "params", "[1, 2]")
    with pytest.raises(InternalError):
        jobs.get(T1, a.job_id)


def test_tenant_purge_removes_jobs_and_only_that_tenants(
    state: ClusterState, raw: redis.Redis[str]
) -> None:
    t1, _ = state.tenants.create("one")
    t2, _ = state.tenants.create("two")
    mine = state.jobs.create(_rec(t1.tenant_id))
    running = state.jobs.create(_rec(t1.tenant_id))
    theirs = state.jobs.create(_rec(t2.tenant_id))
    claimed = state.jobs.claim("ex-1", BASE, 10_000)
    assert claimed is not None and claimed.job_id == mine.job_id
    state.tenants.delete(t1.tenant_id)
    left = [k for k in raw.scan_iter("vajra:job*") if t1.tenant_id in k]
    assert left == []
    assert not raw.exists(keys.job(mine.job_id)) and not raw.exists(keys.job(running.job_id))
    assert state.jobs.running_on("ex-1") == []
    assert state.jobs.renew(mine.job_id, "ex-1", 1000) is False
    assert state.jobs.get(t2.tenant_id, theirs.job_id).status == "queued"
    got = state.jobs.claim("ex-2", BASE, 1000)
    assert got is not None and got.job_id == theirs.job_id
