"""Arrival predictors on synthetic periodic and bursty arrivals, and careless input."""

from __future__ import annotations

import math
import random

import pytest

from vajra.policies.placement import AdapterKey
from vajra.policies.predictors import (
    EwmaPredictor,
    HistogramPredictor,
    KeepAlivePredictor,
    LruReactive,
    predict_many,
)

K: AdapterKey = ("tenant", "digest")


def test_ewma_error_falls_on_periodic_traffic() -> None:
    rng = random.Random(1)
    p = EwmaPredictor(weight=0.3)
    t, errors = 0.0, []
    for i in range(60):
        # A slow start (a 20 s gap), then every second with a little jitter.
        t += (20_000.0 if i == 1 else 1_000.0) + rng.uniform(-20, 20)
        guess = p.predict_next(K, t - 500.0)
        if guess is not None:
            errors.append(abs(guess - t))
        p.observe(K, t)
    assert len(errors) >= 50
    early, late = sum(errors[:5]) / 5, sum(errors[-20:]) / 20
    assert late < 40.0 and late < early / 10


def test_ewma_overdue_then_gives_up() -> None:
    p = EwmaPredictor(weight=0.5, patience=3.0)
    assert p.predict_next(K, 0) is None
    p.observe(K, 0)
    assert p.predict_next(K, 0) is None  # one arrival: no gap yet
    p.observe(K, 100)
    assert p.predict_next(K, 150) == 200
    assert p.predict_next(K, 250) == 250  # overdue: any moment
    assert p.stable_until(K, 250) == 400
    assert p.predict_next(K, 401) is None
    assert p.stable_until(K, 401) == math.inf
    p.observe(K, 50)  # goes backwards: clamped, gap 0
    assert p.predict_next(K, 100) is not None
    p.forget(K)
    assert p.predict_next(K, 100) is None


def test_histogram_windows_match_a_known_distribution() -> None:
    # Idle times uniform over 10..20 minutes: the 5th percentile falls in minute 10, the 99th
    # in minute 19, so pre-warm is 10 min less 10%, keep-alive reaches 20 min plus 10%.
    rng = random.Random(7)
    h = HistogramPredictor(bin_ms=60_000, range_ms=4 * 3_600_000, min_samples=5)
    t = 0.0
    h.observe(K, t)
    for _ in range(400):
        t += rng.uniform(10 * 60_000, 20 * 60_000 - 1)
        h.observe(K, t)
    assert h.representative(K)
    prewarm, keepalive = h.windows(K)
    assert prewarm == pytest.approx(10 * 60_000 * 0.9)
    assert prewarm + keepalive == pytest.approx(20 * 60_000 * 1.1)
    # Before the pre-warm window: the window's start; inside keep-alive: now; after: None.
    assert h.predict_next(K, t + 60_000) == pytest.approx(t + prewarm)
    assert h.predict_next(K, t + 15 * 60_000) == t + 15 * 60_000
    assert h.predict_next(K, t + 30 * 60_000) is None
    assert h.stable_until(K, t + 60_000) == pytest.approx(t + prewarm)


def test_histogram_falls_back_to_keepalive_when_not_representative() -> None:
    h = HistogramPredictor(bin_ms=1_000, range_ms=100_000, fallback_keepalive_ms=5_000)
    h.observe(K, 0)
    h.observe(K, 30_000)  # one idle time: too few samples
    assert not h.representative(K)
    assert h.windows(K) == (0.0, 5_000)
    # Idle times spread evenly over every bin: low coefficient of variation.
    flat = HistogramPredictor(bin_ms=1_000, range_ms=20_000, min_samples=5)
    t = 0.0
    for i in range(200):
        flat.observe(K, t)
        t += (i % 20) * 1_000 + 500
    assert not flat.representative(K)
    # Idle times beyond the range: out of bounds, fallback.
    far = HistogramPredictor(bin_ms=1_000, range_ms=10_000, min_samples=2)
    for i in range(10):
        far.observe(K, i * 1_000_000.0)
    assert not far.representative(K)
    assert far.windows(("other", "key")) == (0.0, far.fallback_keepalive_ms)


def test_keepalive_and_lru_baselines() -> None:
    k = KeepAlivePredictor(keepalive_ms=600_000)
    k.observe(K, 1_000)
    assert k.predict_next(K, 500_000) == 500_000
    assert k.stable_until(K, 500_000) == 601_000
    assert k.predict_next(K, 601_001) is None
    lru = LruReactive()
    lru.observe(K, 0)
    assert not lru.proactive and lru.predict_next(K, 0) is None
    assert predict_many(k, [K, ("x", "y")], 2_000) == [2_000, None]


@pytest.mark.parametrize(
    "make",
    [
        lambda: EwmaPredictor(weight=0),
        lambda: EwmaPredictor(weight=2),
        lambda: EwmaPredictor(patience=float("nan")),
        lambda: HistogramPredictor(bin_ms=0),
        lambda: HistogramPredictor(head_percentile=99, tail_percentile=5),
        lambda: HistogramPredictor(min_samples=0),
        lambda: KeepAlivePredictor(keepalive_ms=-1),
    ],
)
def test_bad_parameters_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]
