"""Per-tenant limits: pure, with the time passed in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vajra.errors import ErrorCode, RateLimited
from vajra.policies.limits import TenantLimits


def test_token_bucket_refills_at_its_rate() -> None:
    limits = TenantLimits(rate_per_s=2.0, burst=3, max_inflight=100)
    now = 100.0
    for _ in range(3):
        assert limits.admit("a", now, generation=True) is None
        limits.release("a")
    refused = limits.admit("a", now, generation=True)
    assert isinstance(refused, RateLimited) and refused.code is ErrorCode.RATE_LIMITED
    assert refused.retriable and refused.retry_after_s == 0.5  # one token at 2/s
    assert limits.inflight("a") == 0  # a refusal takes nothing
    assert limits.admit("b", now, generation=True) is None  # another tenant: its own bucket
    assert limits.admit("a", now + 0.5, generation=False) is None
    assert limits.admit("a", now + 0.5, generation=False) is not None


def test_concurrency_limit_counts_generations_in_flight_only() -> None:
    limits = TenantLimits(rate_per_s=1000.0, burst=1000, max_inflight=2)
    assert limits.admit("a", 0.0, generation=True) is None
    assert limits.admit("a", 0.0, generation=True) is None
    refused = limits.admit("a", 0.0, generation=True)
    assert refused is not None and refused.code is ErrorCode.CONCURRENCY_LIMITED
    assert limits.admit("a", 0.0, generation=False) is None  # a query is not a generation
    limits.release("a")
    assert limits.admit("a", 0.0, generation=True) is None
    assert limits.inflight("a") == 2


def test_zero_turns_a_limit_off() -> None:
    limits = TenantLimits(rate_per_s=0.0, burst=1, max_inflight=0)
    assert all(limits.admit("a", 0.0, generation=True) is None for _ in range(1000))
    assert limits.inflight("a") == 1000


def test_idle_tenants_are_forgotten_when_the_table_is_full() -> None:
    limits = TenantLimits(rate_per_s=1.0, burst=1, max_inflight=1, max_tenants=2)
    assert limits.admit("a", 0.0, generation=True) is None
    limits.release("a")
    assert limits.admit("b", 0.0, generation=True) is None
    assert limits.admit("c", 10.0, generation=True) is None  # prunes a (idle, full), keeps b
    assert len(limits) == 2 and limits.inflight("b") == 1


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(0.5, 50.0),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=200),
)
def test_admitted_never_exceeds_burst_plus_rate_times_elapsed(
    rate: float, burst: int, gaps: list[float]
) -> None:
    limits = TenantLimits(rate_per_s=rate, burst=burst, max_inflight=0)
    now, admitted = 0.0, 0
    for gap in gaps:
        now += gap
        if limits.admit("t", now, generation=False) is None:
            admitted += 1
    assert admitted <= burst + rate * now + 1e-9
