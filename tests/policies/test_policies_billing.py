"""Billing formulas: pure arithmetic, checked on the paper's prices and on invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vajra.config import PoliciesConfig
from vajra.policies.billing import MS_PER_HOUR, billed_gpu_ms, inference_cost_usd

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
