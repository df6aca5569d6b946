"""The online LSTM forecaster learns a periodic pattern better than a constant rate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vajra.forecast.lstm import LstmPredictor
from vajra.policies.placement import AdapterKey


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _poisson_nll(rates: np.ndarray, counts: np.ndarray) -> float:
    rates = np.maximum(rates, 1e-6)
    return float(np.mean(rates - counts * np.log(rates)))


def test_learns_a_periodic_pattern_better_than_a_constant() -> None:
    # 32 adapters, each with a burst of 3 arrivals every 4th bin (different phases).
    p = LstmPredictor(
        bin_ms=1_000,
        window=8,
        horizon=4,
        hidden=16,
        batch_size=64,
        steps_per_bin=4,
        lr=0.02,
        seed=0,
    )
    keys: list[AdapterKey] = [("t", f"a{i}") for i in range(32)]

    def arrivals(b: int) -> dict[AdapterKey, int]:
        return {k: 3 for i, k in enumerate(keys) if (b + i) % 4 == 0}

    for b in range(300):
        for k, n in arrivals(b).items():
            for j in range(n):
                p.observe(k, b * 1_000 + 100 + j)
    # Evaluate on the next bins: the model's rates against the truth, and the constant
    # (mean rate over the window) baseline.
    now = 300 * 1_000 + 1
    rates = p.rates(keys, now)
    truth = np.array([[arrivals(300 + h).get(k, 0) for h in range(4)] for k in keys], dtype=float)
    constant = np.full_like(truth, 3 / 4)
    assert p.trained_steps > 0 and p.last_loss is not None and math.isfinite(p.last_loss)
    assert _poisson_nll(rates, truth) < 0.8 * _poisson_nll(constant, truth)
    # predict_next: an adapter whose burst is this bin predicts "now-ish"; one whose burst is
    # three bins away predicts later.
    soon = next(k for i, k in enumerate(keys) if (300 + i) % 4 == 0)
    later = next(k for i, k in enumerate(keys) if (303 + i) % 4 == 0)
    t_soon, t_later = p.predict_many([soon, later], now)
    assert t_soon is not None and t_soon < now + 1_000
    assert t_later is not None and t_later > now + 1_500


def test_rates_scale_with_each_adapters_own_level_even_untrained() -> None:
    # One model for adapters whose levels differ a hundredfold: a busy adapter (50 arrivals a
    # bin) is forecast busy, a rare one (one arrival every 8 bins) rare, before any training.
    p = LstmPredictor(bin_ms=1_000, window=8, horizon=4, steps_per_bin=0)
    busy, rare = ("t", "busy"), ("t", "rare")
    for b in range(20):
        for j in range(50):
            p.observe(busy, b * 1_000 + 10 * j)
        if b % 8 == 0:
            p.observe(rare, b * 1_000 + 5)
    now = 20 * 1_000 + 1
    rates = p.rates([busy, rare], now)
    assert rates[0].min() > 10 * rates[1].max() > 0
    t_busy, t_rare = p.predict_many([busy, rare], now)
    assert t_busy is not None and t_busy < now + 100  # dozens expected in this bin
    assert t_rare is None or t_rare > now + 500


def test_an_adapter_waking_after_a_quiet_spell_is_expected_again_within_its_bin() -> None:
    # Its completed bins are all empty, so the model alone forecasts it idle until this bin
    # completes; the nowcast (this bin's arrivals so far) expects it again within the bin.
    p = LstmPredictor(bin_ms=1_000, window=8, horizon=4, steps_per_bin=0)
    sleeper, other = ("t", "sleeper"), ("t", "other")
    for b in range(40):
        p.observe(other, b * 1_000 + 1)
    p.observe(sleeper, 39_000 + 100)  # its first arrival in 39 bins
    p.observe(sleeper, 39_000 + 150)
    now = 39_000 + 200
    assert p.rates([sleeper], now)[0, 0] < 0.1  # the model alone: idle
    t = p.predict_next(sleeper, now)
    assert t is not None and now <= t < 40_000, t
    # One arrival so far instead of two implies a lower rate: expected later.
    q = LstmPredictor(bin_ms=1_000, window=8, horizon=4, steps_per_bin=0)
    for b in range(40):
        q.observe(other, b * 1_000 + 1)
    q.observe(sleeper, 39_000 + 100)
    later = q.predict_next(sleeper, now)
    assert later is None or later > t


def test_unknown_and_idle_adapters_predict_nothing() -> None:
    p = LstmPredictor(bin_ms=1_000, window=4, horizon=2, steps_per_bin=0)
    assert p.predict_next(("t", "x"), 0) is None
    p.observe(("t", "a"), 500)
    assert p.stable_until(("t", "a"), 1_500) == 2_000
    assert p.stable_until(("t", "x"), 1_500) == math.inf
    # Long after its only arrival, the ring is empty: no prediction.
    assert p.predict_next(("t", "a"), 1_000_000) is None
    p.observe(("t", "a"), 0)  # older than the ring: ignored
    p.forget(("t", "a"))
    assert p.predict_next(("t", "a"), 1_000_001) is None


@pytest.mark.parametrize(
    "kw",
    [dict(bin_ms=0), dict(bin_ms=math.nan), dict(window=0), dict(lr=0), dict(steps_per_bin=-1)],
)
def test_bad_parameters_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        LstmPredictor(**kw)
