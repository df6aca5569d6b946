"""Usage accounting and predictor events against a real embedded Valkey.

See conftest.py for the rules. The Hypothesis test uses the session's server directly
(not the per-test flush) and isolates each example by a fresh tenant id.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from vajra.errors import InternalError, InvalidRequest
from vajra.policies.billing import UsageRow
from vajra.state import ClusterState, UsageRecord, UsageTotals, keys


def _rec(**changes: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "event_id": "ev-1",
        "tenant_id": "t_1",
        "request_id": "req-1",
        "executor_id": "exec-0",
        "gpu_ms": 12.5,
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "ts_ms": 1_700_000_000_000,
    }
    fields.update(changes)
    return UsageRecord(**fields)


def test_unknown_tenant_has_zero_usage(state: ClusterState) -> None:
    assert state.usage.get("t_1") == UsageTotals("t_1", 0, 0.0, 0, 0)


def test_repeated_event_counted_once(state: ClusterState, raw: redis.Redis[str]) -> None:
    rec = _rec()
    assert state.usage.record(rec) is True
    assert state.usage.record(rec) is False
    assert state.usage.record(_rec(gpu_ms=99.0)) is False  # same id, different body: still a dup
    assert state.usage.get("t_1") == UsageTotals("t_1", 1, 12.5, 10, 20)

    entries = raw.xrange(keys.usage_events())
    assert len(entries) == 1
    _, fields = entries[0]
    assert fields == {
        "event_id": "ev-1",
        "tenant_id": "t_1",
        "request_id": "req-1",
        "executor_id": "exec-0",
        "gpu_ms": "12.5",
        "prompt_tokens": "10",
        "completion_tokens": "20",
        "ts_ms": "1700000000000",
        "adapter": "",
        "adapter_version": "0",
        "kind": "inference",
        "gradients": "0",
        "billed_ms": "0",
    }
    assert raw.ttl(keys.usage_event("ev-1")) > 0


def test_totals_are_per_tenant(state: ClusterState) -> None:
    state.usage.record(_rec(event_id="e1", tenant_id="t_a", gpu_ms=1.0))
    state.usage.record(_rec(event_id="e2", tenant_id="t_a", gpu_ms=2.0, prompt_tokens=1))
    state.usage.record(_rec(event_id="e3", tenant_id="t_b", gpu_ms=4.0))
    assert state.usage.get("t_a") == UsageTotals("t_a", 2, 3.0, 11, 40)
    assert state.usage.get("t_b") == UsageTotals("t_b", 1, 4.0, 10, 20)


def test_stream_trimmed_when_capped(valkey_url: str, raw: redis.Redis[str]) -> None:
    with ClusterState(valkey_url, usage_stream_maxlen=10) as capped:
        for i in range(500):
            capped.usage.record(_rec(event_id=f"e{i}"))
        assert capped.usage.get("t_1").requests == 500
    assert raw.xlen(keys.usage_events()) < 500


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"event_id": ""}, "event_id"),
        ({"event_id": "a:b"}, "event_id"),
        ({"tenant_id": ""}, "tenant_id"),
        ({"tenant_id": "events"}, "tenant_id"),
        ({"gpu_ms": -1.0}, "gpu_ms"),
        ({"gpu_ms": float("nan")}, "gpu_ms"),
        ({"gpu_ms": float("inf")}, "gpu_ms"),
        ({"prompt_tokens": -1}, "prompt_tokens"),
        ({"completion_tokens": 1.5}, "completion_tokens"),
        ({"ts_ms": -5}, "ts_ms"),
        ({"adapter": "a|b"}, "adapter"),
        ({"adapter": "x" * 129}, "adapter"),
        ({"adapter_version": -1}, "adapter_version"),
        ({"kind": "mining"}, "kind"),
        ({"kind": ""}, "kind"),
        ({"gradients": -3}, "gradients"),
        ({"gradients": 2**60}, "gradients"),
        ({"billed_ms": 1.5}, "billed_ms"),
        ({"billed_ms": True}, "billed_ms"),
    ],
)
def test_invalid_usage_rejected(
    state: ClusterState, raw: redis.Redis[str], changes: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        state.usage.record(_rec(**changes))
    assert info.value.field == field
    assert raw.dbsize() == 0


_records = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=15),  # event id: small range, so duplicates occur
        st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
        st.integers(min_value=0, max_value=10**6),
        st.integers(min_value=0, max_value=10**6),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(records=_records)
def test_totals_equal_sum_over_distinct_events(
    valkey_url: str, records: list[tuple[int, float, int, int]]
) -> None:
    run = uuid.uuid4().hex
    tenant_id = f"t_{run}"
    first_by_id: dict[int, tuple[float, int, int]] = {}
    with ClusterState(valkey_url) as cs:
        for event, gpu_ms, prompt, completion in records:
            rec = _rec(
                event_id=f"{run}-{event}",
                tenant_id=tenant_id,
                gpu_ms=gpu_ms,
                prompt_tokens=prompt,
                completion_tokens=completion,
            )
            was_new = cs.usage.record(rec)
            assert was_new == (event not in first_by_id)
            first_by_id.setdefault(event, (gpu_ms, prompt, completion))
        totals = cs.usage.get(tenant_id)
    counted = first_by_id.values()
    assert totals.requests == len(first_by_id)
    assert totals.prompt_tokens == sum(p for _, p, _ in counted)
    assert totals.completion_tokens == sum(c for _, _, c in counted)
    assert totals.gpu_ms == pytest.approx(sum(g for g, _, _ in counted), rel=1e-9, abs=1e-9)


def test_request_events(state: ClusterState) -> None:
    stats = state.events.stats("a1")
    assert (stats.requests, stats.last_ms) == (0, None)
    state.events.record("a1", 2000)
    state.events.record("a1", 1000)  # late arrival does not move last_ms back
    state.events.record("a2", 5)
    stats = state.events.stats("a1")
    assert (stats.adapter, stats.requests, stats.last_ms) == ("a1", 2, 2000)
    assert state.events.stats("a2").requests == 1


@pytest.mark.parametrize(("adapter", "ts_ms"), [("", 1), ("a1", -1)])
def test_invalid_request_event(state: ClusterState, adapter: str, ts_ms: int) -> None:
    with pytest.raises(InvalidRequest):
        state.events.record(adapter, ts_ms)


@settings(max_examples=40, deadline=None)
@given(records=_records, split=st.integers(min_value=1, max_value=8))
def test_batches_count_each_distinct_event_once(
    valkey_url: str, records: list[tuple[int, float, int, int]], split: int
) -> None:
    """Batched recording (duplicates inside a batch and across batches, several tenants in one
    batch) matches recording one by one, per tenant."""
    run = uuid.uuid4().hex
    tenants = [f"t_{run}_{i}" for i in range(3)]
    recs = [
        _rec(
            event_id=f"{run}-{e}",
            tenant_id=tenants[e % 3],
            gpu_ms=g,
            prompt_tokens=p,
            completion_tokens=c,
        )
        for e, g, p, c in records
    ]
    first: dict[str, UsageRecord] = {}
    with ClusterState(valkey_url) as cs:
        for i in range(0, len(recs), split):
            batch = recs[i : i + split]
            fresh = cs.usage.record_many(batch)
            expected = []
            for r in batch:
                expected.append(r.event_id not in first)
                first.setdefault(r.event_id, r)
            assert fresh == expected
        for tenant in tenants:
            totals = cs.usage.get(tenant)
            counted = [r for r in first.values() if r.tenant_id == tenant]
            assert totals.requests == len(counted)
            assert totals.prompt_tokens == sum(r.prompt_tokens for r in counted)
            assert totals.completion_tokens == sum(r.completion_tokens for r in counted)
            assert totals.gpu_ms == pytest.approx(
                sum(r.gpu_ms for r in counted), rel=1e-9, abs=1e-9
            )


# --- buckets: per day, adapter, version and kind -------------------------------------------

DAY_MS = 86_400_000
DAY0 = 1_700_000_000_000 // DAY_MS  # 2023-11-14


def test_buckets_by_day_adapter_version_and_kind(state: ClusterState) -> None:
    t0 = DAY0 * DAY_MS
    records = [
        _rec(
            event_id="a", ts_ms=t0 + 1, gpu_ms=1.25, billed_ms=10, adapter="chat", adapter_version=1
        ),
        _rec(
            event_id="b", ts_ms=t0 + 2, gpu_ms=2.5, billed_ms=10, adapter="chat", adapter_version=1
        ),
        _rec(event_id="c", ts_ms=t0 + 3, adapter="chat", adapter_version=2, billed_ms=20),
        _rec(event_id="d", ts_ms=t0 + DAY_MS, billed_ms=20),  # the next day, base model
        _rec(
            event_id="e",
            ts_ms=t0 + 5,
            kind="training",
            adapter="chat",
            adapter_version=2,
            gradients=1_000,
            gpu_ms=7.0,
            prompt_tokens=64,
            completion_tokens=0,
        ),
    ]
    assert state.usage.record_many(records) == [True] * 5
    assert state.usage.record_many(records) == [False] * 5  # resent: nothing counted twice
    rows = state.usage.rows("t_1")
    assert rows == [
        UsageRow(DAY0, "chat", 1, "inference", 2, 3750, 20, 20, 40, 0),
        UsageRow(DAY0, "chat", 2, "inference", 1, 12500, 20, 10, 20, 0),
        UsageRow(DAY0, "chat", 2, "training", 1, 7000, 0, 64, 0, 1000),
        UsageRow(DAY0 + 1, "", 0, "inference", 1, 12500, 20, 10, 20, 0),
    ]
    totals = state.usage.get("t_1")
    assert (totals.requests, totals.billed_ms, totals.gradients) == (5, 60, 1000)
    assert totals.prompt_tokens == sum(r.prompt_tokens for r in rows)


def test_rows_answer_ranges_of_utc_days(state: ClusterState) -> None:
    for d in range(5):
        state.usage.record(_rec(event_id=f"d{d}", ts_ms=(DAY0 + d) * DAY_MS + 5, billed_ms=10))

    def days(**kw: int) -> list[int]:
        return [r.day - DAY0 for r in state.usage.rows("t_1", **kw)]

    assert days() == [0, 1, 2, 3, 4]
    assert days(start_ms=(DAY0 + 1) * DAY_MS) == [1, 2, 3, 4]
    assert days(start_ms=(DAY0 + 1) * DAY_MS + 1) == [1, 2, 3, 4]  # any overlap counts
    assert days(end_ms=(DAY0 + 2) * DAY_MS) == [0, 1]  # end excluded
    assert days(end_ms=(DAY0 + 2) * DAY_MS + 1) == [0, 1, 2]
    assert days(start_ms=(DAY0 + 1) * DAY_MS, end_ms=(DAY0 + 3) * DAY_MS) == [1, 2]
    assert days(start_ms=(DAY0 + 9) * DAY_MS) == []
    assert days(end_ms=0) == []
    assert state.usage.rows("t_other") == []


def test_buckets_are_per_tenant_and_gone_with_the_tenant(state: ClusterState) -> None:
    record, _ = state.tenants.create("acme")
    t = record.tenant_id
    state.usage.record(_rec(event_id="x1", tenant_id=t, billed_ms=10))
    state.usage.record(_rec(event_id="x2", tenant_id="t_other", billed_ms=10))
    assert len(state.usage.rows(t)) == 1
    state.tenants.delete(t)
    assert state.usage.rows(t) == []
    # Late usage of the deleted tenant stays in the stream but recreates no bucket.
    assert state.usage.record(_rec(event_id="x3", tenant_id=t, billed_ms=10))
    assert state.usage.rows(t) == [] and state.usage.get(t).requests == 0
    assert len(state.usage.rows("t_other")) == 1


def test_malformed_bucket_is_an_internal_error(state: ClusterState, raw: redis.Redis[str]) -> None:
    raw.hset(keys.usage("t_1"), "b|notaday|x|1|inference|n", "3")
    with pytest.raises(InternalError):
        state.usage.rows("t_1")


def test_stream_is_trimmed_after_aggregation(valkey_url: str, raw: redis.Redis[str]) -> None:
    with ClusterState(valkey_url) as cs:
        capped = cs.usage.with_stream_maxlen(50)
        for i in range(0, 1000, 100):
            capped.record_many([_rec(event_id=f"s{j}", billed_ms=10) for j in range(i, i + 100)])
        assert raw.xlen(keys.usage_events()) < 1000
        rows = capped.rows("t_1")
        assert sum(r.events for r in rows) == 1000 and sum(r.billed_ms for r in rows) == 10_000
        with pytest.raises(InvalidRequest):
            cs.usage.with_stream_maxlen(0)
