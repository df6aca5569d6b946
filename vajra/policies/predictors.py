# Over 400 lines: the predictors share one protocol and the histogram's idle-time state (the
# gap predictor extends it); one module keeps the family the prefetcher chooses from together.
"""Per-adapter arrival predictors for prefetch (Algorithm 1's ``PredictNextRequest``).

Every predictor keys adapters by :data:`~vajra.policies.placement.AdapterKey` (tenant,
digest) and answers :meth:`ArrivalPredictor.predict_next`: the predicted time of the next
arrival (ms, on the caller's clock; ``now_ms`` itself when one is expected any moment), or None
when none is expected soon — the prefetcher then lets the adapter sink to a cheaper tier.

* :class:`EwmaPredictor`: exponentially weighted mean of inter-arrival gaps; the next arrival is
  the last one plus that mean. Once overdue it answers ``now_ms`` until ``patience`` times the
  longest of the last 8 gaps has passed since the last arrival (so bursty traffic is not given
  up on between bursts), then None.
* :class:`HistogramPredictor`: the hybrid histogram policy of "Serverless in the Wild" (Shahrad
  et al., ATC 2020), per adapter: a histogram of idle times (gaps between arrivals) in
  ``bin_ms`` bins up to ``range_ms``; the pre-warm window is the 5th percentile of idle times
  (less a 10% margin), the keep-alive window reaches to the 99th percentile (plus 10%). Before
  the pre-warm window ends the predictor answers the window's end; inside the keep-alive window
  ``now_ms``; after it, None. When the histogram is not representative (fewer than
  ``min_samples`` idle times, their bin counts' coefficient of variation below
  ``cv_threshold``, or most idle times beyond ``range_ms``) it falls back to a fixed keep-alive
  of ``fallback_keepalive_ms`` (the paper's ARIMA for out-of-range idle times is not built).
* :class:`GapPredictor`: the histogram's recent idle times as point forecasts (the conditional
  median idle time), for prefetching just ahead of a periodic adapter.
* :class:`KeepAlivePredictor`: fixed keep-alive (``now_ms`` until ``keepalive_ms`` after the last
  arrival, then None): the serverless baseline.
* :class:`LruReactive`: no prediction at all (``proactive = False``): adapters load on demand and
  leave by the executors' LRU eviction. The baseline for "reactive loading".

For eviction (:func:`vajra.policies.eviction.predicted_victim`) the prefetcher ranks resident
adapters by :func:`next_arrival_estimate`: a point estimate of the next arrival, never "any
moment" when the predictor can say more. The histogram answers the median of its recent idle
times longer than the idle time so far (the conditional median); EWMA the last arrival plus the
mean gap, then the conditional median of its last 8 gaps; the others ``predict_next``.

The torch LSTM predictor lives outside this package (:mod:`vajra.forecast.lstm`). Pure code:
no I/O, no clock; arrival times that go backwards are clamped to the last one seen. Invalid
parameters raise ``ValueError`` at construction.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vajra.policies.placement import AdapterKey


class ArrivalPredictor(Protocol):
    proactive: bool  # False: never prefetches (reactive baselines)

    def observe(self, key: AdapterKey, t_ms: float) -> None: ...

    def predict_next(self, key: AdapterKey, now_ms: float) -> float | None: ...

    def stable_until(self, key: AdapterKey, now_ms: float) -> float:
        """Until when ``predict_next`` keeps its answer without new arrivals (math.inf: until
        the next arrival); the prefetcher re-plans an adapter only then."""
        ...

    def forget(self, key: AdapterKey) -> None: ...


def predict_many(
    predictor: ArrivalPredictor, keys: Iterable[AdapterKey], now_ms: float
) -> list[float | None]:
    """Batched form for predictors without their own (the LSTM has one)."""
    batched = getattr(predictor, "predict_many", None)
    if batched is not None:
        return list(batched(list(keys), now_ms))
    return [predictor.predict_next(k, now_ms) for k in keys]


def next_arrival_estimate(
    predictor: ArrivalPredictor, key: AdapterKey, now_ms: float
) -> float | None:
    """The predictor's point estimate of ``key``'s next arrival, for ranking eviction victims:
    its ``expected_next_ms`` when it has one, else ``predict_next``. None: none expected."""
    expected = getattr(predictor, "expected_next_ms", None)
    if expected is not None:
        out: float | None = expected(key, now_ms)
        return out
    return predictor.predict_next(key, now_ms)


def _check_positive(**values: float) -> None:
    for name, v in values.items():
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be finite and > 0, got {v!r}")


@dataclass(slots=True)
class _Ewma:
    last_ms: float
    gap_ms: float | None = None
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=8))  # last gaps


class EwmaPredictor:
    """Exponentially weighted mean inter-arrival time (``weight`` on the newest gap)."""

    proactive = True

    def __init__(self, *, weight: float = 0.3, patience: float = 3.0) -> None:
        _check_positive(weight=weight, patience=patience)
        if weight > 1:
            raise ValueError("weight must be <= 1")
        self.weight = weight
        self.patience = patience
        self._state: dict[AdapterKey, _Ewma] = {}

    def observe(self, key: AdapterKey, t_ms: float) -> None:
        s = self._state.get(key)
        if s is None:
            self._state[key] = _Ewma(t_ms)
            return
        gap = max(0.0, t_ms - s.last_ms)
        s.gap_ms = gap if s.gap_ms is None else s.gap_ms + self.weight * (gap - s.gap_ms)
        s.recent.append(gap)
        s.last_ms = max(s.last_ms, t_ms)

    def mean_gap_ms(self, key: AdapterKey) -> float | None:
        s = self._state.get(key)
        return None if s is None else s.gap_ms

    def predict_next(self, key: AdapterKey, now_ms: float) -> float | None:
        s = self._state.get(key)
        if s is None or s.gap_ms is None:
            return None
        nxt = s.last_ms + s.gap_ms
        if nxt >= now_ms:
            return nxt
        if now_ms - s.last_ms <= self._give_up_after(s):
            return now_ms  # overdue: expected any moment
        return None

    def expected_next_ms(self, key: AdapterKey, now_ms: float) -> float | None:
        """For ranking victims: the last arrival plus the mean gap; once that has passed, the
        median of the last 8 gaps longer than the idle time so far; then ``predict_next``."""
        s = self._state.get(key)
        if s is None or s.gap_ms is None:
            return None
        nxt = s.last_ms + s.gap_ms
        if nxt >= now_ms:
            return nxt
        later = sorted(g for g in s.recent if g >= now_ms - s.last_ms)
        if later:
            return s.last_ms + later[len(later) // 2]
        return self.predict_next(key, now_ms)

    def _give_up_after(self, s: _Ewma) -> float:
        """How long after the last arrival one is still expected: ``patience`` times the
        longest of the last 8 gaps (bursty traffic: the gap between bursts, not within)."""
        return self.patience * max(max(s.recent, default=0.0), s.gap_ms or 0.0, 1.0)

    def stable_until(self, key: AdapterKey, now_ms: float) -> float:
        s = self._state.get(key)
        if s is None or s.gap_ms is None:
            return math.inf
        nxt = s.last_ms + s.gap_ms
        if nxt >= now_ms:
            return nxt
        give_up = s.last_ms + self._give_up_after(s)
        return give_up if give_up >= now_ms else math.inf

    def forget(self, key: AdapterKey) -> None:
        self._state.pop(key, None)


_RECENT = 64  # idle times kept exactly per adapter, for HistogramPredictor.expected_next_ms


@dataclass(slots=True)
class _Histogram:
    last_ms: float
    bins: list[int]
    samples: int = 0
    out_of_range: int = 0
    windows: tuple[float, float] | None = field(default=None)  # cached (pre-warm, keep-alive)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=_RECENT))  # idle times


class HistogramPredictor:
    """The "Serverless in the Wild" hybrid histogram policy; see the module docstring."""

    proactive = True

    def __init__(
        self,
        *,
        bin_ms: float = 60_000.0,
        range_ms: float = 4 * 3_600_000.0,
        head_percentile: float = 5.0,
        tail_percentile: float = 99.0,
        margin: float = 0.1,
        min_samples: int = 5,
        cv_threshold: float = 2.0,
        fallback_keepalive_ms: float = 600_000.0,
    ) -> None:
        _check_positive(bin_ms=bin_ms, range_ms=range_ms, keepalive=fallback_keepalive_ms)
        if not 0 <= head_percentile < tail_percentile <= 100:
            raise ValueError("need 0 <= head_percentile < tail_percentile <= 100")
        if margin < 0 or min_samples < 1 or cv_threshold < 0:
            raise ValueError("margin, min_samples and cv_threshold out of range")
        self.bin_ms = bin_ms
        self.nbins = max(1, math.ceil(range_ms / bin_ms))
        self.head = head_percentile
        self.tail = tail_percentile
        self.margin = margin
        self.min_samples = min_samples
        self.cv_threshold = cv_threshold
        self.fallback_keepalive_ms = fallback_keepalive_ms
        self._state: dict[AdapterKey, _Histogram] = {}

    def observe(self, key: AdapterKey, t_ms: float) -> None:
        s = self._state.get(key)
        if s is None:
            self._state[key] = _Histogram(t_ms, [0] * self.nbins)
            return
        idle = max(0.0, t_ms - s.last_ms)
        s.last_ms = max(s.last_ms, t_ms)
        b = int(idle // self.bin_ms)
        if b >= self.nbins:
            s.out_of_range += 1
        else:
            s.bins[b] += 1
        s.samples += 1
        s.windows = None
        s.recent.append(idle)

    def representative(self, key: AdapterKey) -> bool:
        s = self._state.get(key)
        if s is None or s.samples < self.min_samples or s.out_of_range * 2 > s.samples:
            return False
        counts = s.bins
        mean = sum(counts) / len(counts)
        if mean == 0:
            return False
        var = sum((c - mean) ** 2 for c in counts) / len(counts)
        return math.sqrt(var) / mean >= self.cv_threshold

    def windows(self, key: AdapterKey) -> tuple[float, float]:
        """(pre-warm, keep-alive) in ms after the last arrival; the fixed fallback when the
        histogram is not representative or the adapter is unknown."""
        s = self._state.get(key)
        if s is not None and s.windows is not None:
            return s.windows
        if s is None or not self.representative(key):
            w = (0.0, self.fallback_keepalive_ms)
        else:
            head = self._percentile(s.bins, self.head) * self.bin_ms  # bin's lower edge
            tail = (self._percentile(s.bins, self.tail) + 1) * self.bin_ms  # upper edge
            prewarm = head * (1.0 - self.margin)
            w = (prewarm, tail * (1.0 + self.margin) - prewarm)
        if s is not None:
            s.windows = w
        return w

    @staticmethod
    def _percentile(bins: list[int], pct: float) -> int:
        """The bin index holding the ``pct``-th percentile of the in-range samples."""
        total = sum(bins)
        need = max(1.0, math.ceil(total * pct / 100.0))
        run = 0
        for i, c in enumerate(bins):
            run += c
            if run >= need:
                return i
        return len(bins) - 1

    def predict_next(self, key: AdapterKey, now_ms: float) -> float | None:
        s = self._state.get(key)
        if s is None:
            return None
        prewarm, keepalive = self.windows(key)
        start = s.last_ms + prewarm
        if now_ms < start:
            return start
        if now_ms <= start + keepalive:
            return now_ms
        return None

    def expected_next_ms(
        self, key: AdapterKey, now_ms: float, quantile: float = 0.5
    ) -> float | None:
        """The conditional median idle time: among the adapter's last 64 idle times, the median
        (``quantile``) of those longer than its idle time so far, after its last arrival. Exact times, not
        bins: a one-minute bin cannot tell a 2-second gap from a 50-second one, and ranking
        victims needs that. None: unknown adapter, no idle time seen yet, or none as long as
        the idle time so far."""
        s = self._state.get(key)
        if s is None or not s.recent:
            return None
        idle = now_ms - s.last_ms
        later = sorted(g for g in s.recent if g >= idle)
        if not later:
            return None
        return max(now_ms, s.last_ms + later[min(len(later) - 1, int(len(later) * quantile))])

    def stable_until(self, key: AdapterKey, now_ms: float) -> float:
        s = self._state.get(key)
        if s is None:
            return math.inf
        prewarm, keepalive = self.windows(key)
        start = s.last_ms + prewarm
        if now_ms < start:
            return start
        return start + keepalive if now_ms <= start + keepalive else math.inf

    def forget(self, key: AdapterKey) -> None:
        self._state.pop(key, None)


class GapPredictor(HistogramPredictor):
    """Point forecasts from the same idle times: the next arrival is
    :meth:`HistogramPredictor.expected_next_ms` (the last arrival plus the median of the recent
    idle times at least as long as the idle time so far), None when no recent idle time is that
    long. A periodic adapter is forecast at its period; the prefetcher promotes it to GPU
    memory just ahead of it instead of holding it warm for a whole window."""

    def __init__(
        self, *, quantile: float = 0.5, resolution_ms: float = 0.0, **histogram: Any
    ) -> None:
        if not 0 <= quantile < 1:
            raise ValueError("quantile must be in [0, 1)")
        if not (math.isfinite(resolution_ms) and resolution_ms >= 0):
            raise ValueError("resolution_ms must be finite and >= 0")
        super().__init__(**histogram)
        self.quantile = quantile
        self.resolution_ms = resolution_ms
        self._slots: dict[AdapterKey, _Histogram] = {}  # per-slot arrivals (resolution_ms > 0)

    def observe(self, key: AdapterKey, t_ms: float) -> None:
        """With ``resolution_ms`` > 0 the forecasts also see each arrival at the start of its
        slot (a minute for per-minute traces), the first in a slot only: their idle times are
        whole slots, so a timer's period is seen exactly. Victims are still ranked on the exact
        times (:meth:`expected_next_ms`)."""
        super().observe(key, t_ms)
        if self.resolution_ms > 0:
            slot = t_ms - t_ms % self.resolution_ms
            s = self._slots.get(key)
            if s is None:
                self._slots[key] = _Histogram(slot, [])
            elif slot > s.last_ms:
                s.recent.append(slot - s.last_ms)
                s.last_ms = slot

    def expected_next_ms(
        self, key: AdapterKey, now_ms: float, quantile: float = 0.5
    ) -> float | None:
        """For ranking victims: the sooner of the exact-time conditional median and, with
        ``resolution_ms``, the slot forecast (an adapter promoted for its slot is kept)."""
        exact = super().expected_next_ms(key, now_ms, quantile)
        if self.resolution_ms <= 0:
            return exact
        slot = self.predict_next(key, now_ms)
        if slot is None or exact is None:
            return exact if slot is None else slot
        return min(exact, slot)

    def _history(self, key: AdapterKey) -> _Histogram | None:
        return (self._slots if self.resolution_ms > 0 else self._state).get(key)

    def predict_next(self, key: AdapterKey, now_ms: float) -> float | None:
        """The ``quantile`` of the recent idle times at least as long as the idle so far (a low
        quantile prefetches early and holds the adapter; the median is the point estimate)."""
        s = self._history(key)
        if s is None or not s.recent:
            return None
        idle = now_ms - s.last_ms
        later = sorted(g for g in s.recent if g >= idle)
        if not later:
            return None
        q = later[min(len(later) - 1, int(len(later) * self.quantile))]
        return max(now_ms, s.last_ms + q)

    def stable_until(self, key: AdapterKey, now_ms: float) -> float:
        """The answer changes when the idle time passes the next recent idle time."""
        s = self._history(key)
        if s is None:
            return math.inf
        idle = now_ms - s.last_ms
        return min((s.last_ms + g for g in s.recent if g > idle), default=math.inf)

    def forget(self, key: AdapterKey) -> None:
        super().forget(key)
        self._slots.pop(key, None)


class KeepAlivePredictor:
    """Fixed keep-alive: expected any moment until ``keepalive_ms`` after the last arrival."""

    proactive = True

    def __init__(self, *, keepalive_ms: float = 600_000.0) -> None:
        _check_positive(keepalive_ms=keepalive_ms)
        self.keepalive_ms = keepalive_ms
        self._last: dict[AdapterKey, float] = {}

    def observe(self, key: AdapterKey, t_ms: float) -> None:
        self._last[key] = max(t_ms, self._last.get(key, t_ms))

    def predict_next(self, key: AdapterKey, now_ms: float) -> float | None:
        last = self._last.get(key)
        if last is None or now_ms - last > self.keepalive_ms:
            return None
        return now_ms

    def stable_until(self, key: AdapterKey, now_ms: float) -> float:
        last = self._last.get(key)
        if last is None or now_ms - last > self.keepalive_ms:
            return math.inf
        return last + self.keepalive_ms

    def forget(self, key: AdapterKey) -> None:
        self._last.pop(key, None)


class LruReactive:
    """Reactive loading: no prediction; the prefetcher issues no commands with it."""

    proactive = False

    def observe(self, key: AdapterKey, t_ms: float) -> None:
        return None

    def predict_next(self, key: AdapterKey, now_ms: float) -> float | None:
        return None

    def stable_until(self, key: AdapterKey, now_ms: float) -> float:
        return math.inf

    def forget(self, key: AdapterKey) -> None:
        return None
