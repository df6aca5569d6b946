"""Billing formulas: pure arithmetic, checked on the paper's prices and on invariants
(per-request rounding, gradients, invoices that add up exactly)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vajra.config import PoliciesConfig
from vajra.policies.billing import (
    GROUP_BY,
    MS_PER_HOUR,
    Prices,
    UsageRow,
    billed_gpu_ms,
    cost_usd,
    day_label,
    day_of,
    gpu_us,
    gradients_per_step,
    inference_cost_of_requests,
    inference_cost_usd,
    invoice,
    training_cost_usd,
)

gpu_times = st.floats(min_value=0.0, max_value=1e9, allow_nan=False)


def test_an_hour_of_gpu_time_costs_the_hourly_price_times_the_tenancy_factor() -> None:
    p = PoliciesConfig()
    cost = inference_cost_usd(
        MS_PER_HOUR, gpu_price_per_hour=p.gpu_price_per_hour, tenancy_factor=p.tenancy_factor
    )
    assert cost == pytest.approx(2.00 * 0.3)
    assert inference_cost_usd(830.0, gpu_price_per_hour=2.0, tenancy_factor=0.3) == pytest.approx(
        830.0 * 2.0 / 3_600_000 * 0.3
    )
    assert inference_cost_usd(0.0, gpu_price_per_hour=2.0, tenancy_factor=0.3) == 0.0


@given(gpu_times, gpu_times)
def test_cost_is_linear_in_gpu_time(a: float, b: float) -> None:
    def cost(ms: float) -> float:
        return inference_cost_usd(ms, gpu_price_per_hour=2.0, tenancy_factor=0.3)

    assert cost(a + b) == pytest.approx(cost(a) + cost(b), rel=1e-9, abs=1e-12)
    assert cost(a) >= 0.0


def test_gpu_time_is_billed_in_whole_steps_rounded_up() -> None:
    assert billed_gpu_ms(0.1, 10) == 10.0
    assert billed_gpu_ms(10.0, 10) == 10.0
    assert billed_gpu_ms(10.5, 10) == 20.0
    assert billed_gpu_ms(2.5, 1) == 3.0
    assert billed_gpu_ms(2.5, 0) == 3.0  # a step is at least 1 ms
    assert billed_gpu_ms(0.0, 10) == 0.0
    assert billed_gpu_ms(-5.0, 10) == 0.0
    assert billed_gpu_ms(math.nan, 10) == 0.0


@given(gpu_times, st.integers(min_value=1, max_value=10_000))
def test_billed_time_is_the_smallest_whole_step_count_covering_the_measured_time(
    gpu_ms: float, step: int
) -> None:
    billed = billed_gpu_ms(gpu_ms, step)
    assert billed >= gpu_ms
    assert billed % step == 0
    assert billed - step < gpu_ms or billed == 0.0  # one step less would not cover it


# --- per-request rounding, training, invoices ---------------------------------------------

_requests = st.lists(st.floats(min_value=0.0, max_value=1e6, allow_nan=False), max_size=50)


@given(_requests, st.integers(min_value=1, max_value=1000))
def test_inference_cost_rounds_each_request_before_summing(gpu: list[float], step: int) -> None:
    prices = Prices(granularity_ms=step)
    expected_ms = sum(max(1, math.ceil(ms / step)) * step if ms > 0 else 0 for ms in gpu)
    expected = expected_ms * 2.0 / 3_600_000 * 0.3
    assert inference_cost_of_requests(gpu, prices) == expected
    # Rounding each request never bills less than rounding the sum once.
    assert expected_ms >= billed_gpu_ms(sum(gpu), step) or not gpu


def test_per_request_rounding_on_the_papers_prices() -> None:
    # Three requests of 1 ms each: 3 x 10 ms billed, not 10 ms.
    assert inference_cost_of_requests([1.0, 1.0, 1.0], Prices()) == 30 * 2.0 / 3_600_000 * 0.3


def test_training_cost_is_gradients_times_price_per_million_times_gpu_price() -> None:
    assert training_cost_usd(
        1_000_000, price_per_million_gradients=0.05, gpu_price_per_hour=2.0
    ) == pytest.approx(0.1)
    assert training_cost_usd(0, price_per_million_gradients=0.05, gpu_price_per_hour=2.0) == 0.0
    assert cost_usd(0, 2_000_000, Prices()) == pytest.approx(0.2)
    assert cost_usd(MS_PER_HOUR, 0, Prices()) == pytest.approx(0.6)


def test_a_gradient_is_one_trainable_parameter_in_one_step() -> None:
    assert gradients_per_step(4096) == 4096
    assert gradients_per_step(0) == 0
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError):
            gradients_per_step(bad)  # type: ignore[arg-type]


def test_bad_gpu_times_bill_nothing() -> None:
    for bad in (math.nan, math.inf, -math.inf, -1.0, 0.0):
        assert billed_gpu_ms(bad, 10) == 0
        assert gpu_us(bad) == 0
    assert gpu_us(1.2345) == 1234 or gpu_us(1.2345) == 1235
    assert gpu_us(2.0) == 2000


def test_days_are_utc() -> None:
    assert day_of(0) == 0 and day_label(0) == "1970-01-01"
    assert day_of(86_400_000 - 1) == 0 and day_of(86_400_000) == 1
    assert day_label(day_of(1_700_000_000_000)) == "2023-11-14"


_rows = st.lists(
    st.builds(
        UsageRow,
        day=st.integers(min_value=19_000, max_value=19_010),
        adapter=st.sampled_from(["", "a", "b.v2"]),
        adapter_version=st.integers(min_value=0, max_value=3),
        kind=st.sampled_from(["inference", "training"]),
        events=st.integers(min_value=0, max_value=10**6),
        gpu_us=st.integers(min_value=0, max_value=10**12),
        billed_ms=st.integers(min_value=0, max_value=10**9),
        prompt_tokens=st.integers(min_value=0, max_value=10**9),
        completion_tokens=st.integers(min_value=0, max_value=10**9),
        gradients=st.integers(min_value=0, max_value=10**12),
    ),
    max_size=30,
)


@given(_rows, st.sampled_from([None, *GROUP_BY]))
def test_invoice_lines_add_up_to_the_total_exactly(rows: list[UsageRow], by: str | None) -> None:
    prices = Prices()
    inv = invoice(rows, by, prices)
    total = inv.total
    assert total is not None
    for name in ("events", "billed_ms", "prompt_tokens", "completion_tokens", "gradients"):
        assert sum(getattr(line, name) for line in inv.lines) == getattr(total, name)
    inference_ms = sum(r.billed_ms for r in rows if r.kind == "inference")
    gradients = sum(r.gradients for r in rows if r.kind == "training")
    assert total.billed_ms == inference_ms and total.gradients == gradients
    assert total.cost_usd == cost_usd(inference_ms, gradients, prices)
    assert sum(line.cost_usd for line in inv.lines) == pytest.approx(total.cost_usd, rel=1e-9)
    assert [line.label for line in inv.lines] == sorted({line.label for line in inv.lines})
    if by is None:
        assert [line.label for line in inv.lines] == (["total"] if rows else [])


def test_invoice_labels() -> None:
    rows = [
        UsageRow(19_000, "", 0, "inference", events=1, billed_ms=10),
        UsageRow(19_001, "chat", 2, "training", events=1, gradients=5),
    ]
    assert [line.label for line in invoice(rows, "adapter", Prices()).lines] == [
        "(base)",
        "chat@2",
    ]
    assert [line.label for line in invoice(rows, "kind", Prices()).lines] == [
        "inference",
        "training",
    ]
    assert [line.label for line in invoice(rows, "day", Prices()).lines] == [
        "2022-01-08",
        "2022-01-09",
    ]
    with pytest.raises(ValueError):
        invoice(rows, "tenant", Prices())
    assert invoice([], "kind", Prices()).total == invoice([], None, Prices()).total


def test_prices_come_from_the_policies_config() -> None:
    p = Prices.of(PoliciesConfig())
    assert p == Prices(10, 2.0, 0.3, 0.05)
