"""The predictor's forecasts as an executor's tiers use them: which idle adapter leaves the GPU.

The predictor sends, each plan tick, the predicted next arrival of every adapter it counts as
in GPU memory (:class:`~vajra.bus.messages.AdapterForecasts`, by digest; a digest two tenants
share takes the sooner of their arrivals). While the last forecasts are fresh (younger than
``max_age_ms``), a load that needs room evicts the idle adapter predicted farthest away
(:func:`vajra.policies.eviction.predicted_victim`: Algorithm 1's view of the future instead of
the past); a resident adapter the forecasts do not name (just loaded by a warm swap, or never
requested yet) counts as expected at once, so it is kept while any forecast one can go, and
among equals the least recently used goes. The same ranking picks which idle adapters leave
when more than ``adapters.lru_eviction_threshold`` of the slots are resident after a load
(:meth:`Forecasts.trim`). A GPU prefetch into a full pool is declined unless
an idle adapter is forecast later than the prefetched one (Algorithm 1: never push out what is
needed sooner). Stale or absent forecasts: plain LRU. Malformed forecasts are dropped whole and
counted by the caller.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from vajra.bus.messages import AdapterForecasts
from vajra.policies.eviction import lru_victim, predicted_victim, threshold_victims

__all__ = ["Forecasts"]

MAX_FORECASTS = 100_000  # digests one message may carry (more: dropped whole)


def _now_ms() -> float:
    return time.time() * 1000.0


class Forecasts:
    """The freshest forecasts this executor received (see the module docstring)."""

    def __init__(self, max_age_ms: float, clock: Callable[[], float] = _now_ms) -> None:
        self.max_age_ms = max_age_ms
        self._clock = clock
        self._next: dict[str, float] = {}
        self._received_ms = -math.inf

    def update(self, msg: AdapterForecasts) -> bool:
        """Take ``msg`` as the current forecasts; False (nothing changes) if it is malformed."""
        digests, times = msg.digests, msg.next_arrival_ms
        if len(digests) != len(times) or len(digests) > MAX_FORECASTS:
            return False
        self._next = dict(zip(digests, (float(t) for t in times), strict=True))
        self._received_ms = self._clock()
        return True

    def fresh(self) -> bool:
        return self._clock() - self._received_ms <= self.max_age_ms

    def victim(
        self, lru: Iterable[str], in_use: Callable[[str], bool], before_ms: float | None = None
    ) -> str | None:
        """The adapter of ``lru`` (least recently used first) to evict, or None (all in use).
        ``before_ms``: for a prefetch of an adapter expected then, only one forecast later
        qualifies (None: decline it); stale forecasts allow any (LRU)."""
        if not self.fresh():
            return lru_victim(lru, in_use)
        now = self._clock()
        forecast = self._next
        return predicted_victim(
            lru, in_use, lambda d: forecast.get(d, now), now_ms=now, before_ms=before_ms
        )

    def trim(
        self, lru: Iterable[str], in_use: Callable[[str], bool], num_slots: int, threshold: float
    ) -> list[str]:
        """The idle adapters to evict down to ``threshold`` of ``num_slots``: those forecast
        farthest away first while the forecasts are fresh (one they do not name counts as
        expected at once, so it stays), else the least recently used."""
        if not self.fresh():
            return threshold_victims(lru, in_use, num_slots, threshold)
        now = self._clock()
        forecast = self._next
        return threshold_victims(
            lru,
            in_use,
            num_slots,
            threshold,
            next_arrival_ms=lambda d: forecast.get(d, now),
            now_ms=now,
        )
