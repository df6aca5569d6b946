"""Predictive prefetch: the paper's Algorithm 1, with measured load times.

For each adapter the predictor gives the time ``P`` of its next arrival; ``T = P - now``. With
``L(r -> X)`` the measured time to bring the adapter from its current tier ``r`` up to tier
``X`` (:class:`TierLoadTimes`, updated online from real loads) and ``H = lookahead_ms``, the
tier it should sit in now is the fastest tier ``X`` whose horizon covers ``T``::

    GPU   if T <= horizons[GPU]  * H + L(r -> GPU)
    HOST  if T <= horizons[HOST] * H + L(r -> HOST)
    DISK  if T <= horizons[DISK] * H + L(r -> DISK)
    else  none needed (beyond every horizon, or no arrival expected)

(default horizons 1, 4, 16). A target above the current tier emits a ``promote`` (the most
urgent first, at most ``capacities[X]`` per plan and tier), at most one per tier between two
arrivals (an adapter the executor's LRU evicted after a promote is not pushed back in: that
would fight the eviction). An "any moment" answer (a predicted time already past: keep-alive
windows, overdue EWMA) is no forecast, so with ``stage_overdue`` (default) it stages the adapter
in host memory rather than taking a GPU slot. An adapter above ``demote_to`` (default host
memory) with no arrival expected, idle for ``min_idle_ms`` (default ``lookahead_ms``), is
demoted to ``demote_to`` (a copy stays where it is cheap to bring back; lower tiers keep their
own LRU), unless ``demote_idle`` is False (with predicted eviction: an idle adapter leaves only
when its slot is needed, and then the one predicted farthest away leaves).

Cost: the prefetcher re-plans an adapter only when its decision may change — at an arrival,
when ``T`` crosses a horizon, when its idle time passes ``min_idle_ms``, or when the
predictor's answer may change (:meth:`ArrivalPredictor.stable_until`) — through a due-time
heap, so a plan costs O(d log n) for the d adapters due, not a pass over every adapter.

Eviction with predictions (:meth:`Prefetcher.victim`): when a tier that this prefetcher feeds
is full, the resident adapter whose predicted next arrival is farthest leaves
(:func:`vajra.policies.eviction.predicted_victim`, ranked by
:func:`vajra.policies.predictors.next_arrival_estimate`). For a promote the victim must also be
expected later than ``lookahead_ms`` from now and later than the promoted adapter's own
predicted arrival (``TierCommand.expected_ms``); when none is, the executor declines the promote
(:meth:`Prefetcher.declined`) rather than push out something needed sooner.

Metrics (:class:`PrefetchMetrics`): a promote whose adapter is requested before it is demoted
or evicted is a hit (a GPU hit is a cold start avoided); a promote demoted, evicted or still
unused at :meth:`Prefetcher.close` is wasted, and its bytes are wasted bytes. Prediction error
is the mean absolute difference between a forecast (a ``P`` in the future when made) and the
next arrival. Pure code: no clock, no I/O; invalid parameters raise ``ValueError``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from vajra.policies.eviction import predicted_victim
from vajra.policies.placement import AdapterKey, Tier
from vajra.policies.predictors import ArrivalPredictor, next_arrival_estimate, predict_many

#: Priors (ms to load a 16 MiB adapter into each tier from the one below) used only until a
#: load into that tier has been measured: GPU over PCIe, host from NVMe, disk from the store.
PRIOR_LOAD_MS: Mapping[Tier, float] = {Tier.GPU: 5.0, Tier.HOST: 40.0, Tier.DISK: 400.0}
_PRIOR_BYTES = 16 << 20
_UP_TIERS = (Tier.GPU, Tier.HOST, Tier.DISK)


class TierLoadTimes:
    """Measured load time into each tier, as an EWMA of milliseconds per byte."""

    def __init__(self, prior_ms: Mapping[Tier, float] | None = None, *, weight: float = 0.2):
        if not 0 < weight <= 1:
            raise ValueError("weight must be in (0, 1]")
        prior = dict(PRIOR_LOAD_MS)
        prior.update(prior_ms or {})
        self.weight = weight
        self._ms_per_byte = {t: prior[t] / _PRIOR_BYTES for t in _UP_TIERS}
        self.measured: dict[Tier, int] = {t: 0 for t in _UP_TIERS}

    def observe_load(self, tier: Tier, size_bytes: int, ms: float) -> None:
        """One measured load into ``tier`` (ignored unless size and time are positive)."""
        if tier not in self._ms_per_byte or size_bytes <= 0 or not (ms > 0 and math.isfinite(ms)):
            return
        rate = ms / size_bytes
        if self.measured[tier] == 0:
            self._ms_per_byte[tier] = rate
        else:
            self._ms_per_byte[tier] += self.weight * (rate - self._ms_per_byte[tier])
        self.measured[tier] += 1

    def load_ms(self, tier: Tier, size_bytes: int) -> float:
        """Estimated ms to load ``size_bytes`` into ``tier`` from the tier below."""
        if tier == Tier.REMOTE:
            return 0.0
        return self._ms_per_byte[tier] * max(0, size_bytes)

    def to_tier_ms(self, current: Tier, target: Tier, size_bytes: int) -> float:
        """Estimated ms to bring an adapter up from ``current`` to ``target`` (0 if there)."""
        return sum(self.load_ms(Tier(t), size_bytes) for t in range(target, current))


@dataclass(frozen=True, slots=True)
class TierCommand:
    key: AdapterKey
    executor_id: str | None  # None: wherever placement would send the adapter's next request
    target: Tier
    action: Literal["promote", "demote"]
    reason: str
    size_bytes: int = 0
    expected_ms: float | None = None  # a promote: the predicted arrival it prepares for


@dataclass(slots=True)
class PrefetchMetrics:
    forecasts: int = 0
    abs_error_ms_sum: float = 0.0
    prefetches: int = 0
    hits: int = 0
    wasted: int = 0
    wasted_bytes: int = 0
    prefetched_bytes: int = 0
    cold_starts_avoided: int = 0
    demotes: int = 0
    declined: int = 0  # promotes the executor refused: every victim was needed sooner

    @property
    def prediction_error_ms(self) -> float | None:
        return self.abs_error_ms_sum / self.forecasts if self.forecasts else None

    @property
    def hit_rate(self) -> float | None:
        done = self.hits + self.wasted
        return self.hits / done if done else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "prediction_error_ms": self.prediction_error_ms,
            "hit_rate": self.hit_rate,
            "prefetches": self.prefetches,
            "hits": self.hits,
            "wasted": self.wasted,
            "wasted_bytes": self.wasted_bytes,
            "prefetched_bytes": self.prefetched_bytes,
            "cold_starts_avoided": self.cold_starts_avoided,
            "demotes": self.demotes,
            "declined": self.declined,
        }


class Prefetcher:
    """Algorithm 1 over every adapter seen; see the module docstring."""

    def __init__(
        self,
        predictor: ArrivalPredictor,
        *,
        lookahead_ms: float,
        load_ms: TierLoadTimes | None = None,
        capacities: Mapping[Tier, int] | None = None,
        horizons: Sequence[float] = (1.0, 4.0, 16.0),
        min_idle_ms: float | None = None,
        demote_to: Tier = Tier.HOST,
        stage_overdue: bool = True,
        default_size_bytes: int = _PRIOR_BYTES,
        demote_idle: bool = True,
    ) -> None:
        if not (math.isfinite(lookahead_ms) and lookahead_ms > 0):
            raise ValueError("lookahead_ms must be finite and > 0")
        if (
            len(horizons) != 3
            or any(not h > 0 for h in horizons)
            or list(horizons) != sorted(horizons)
        ):
            raise ValueError("horizons: three positive factors, GPU <= HOST <= DISK")
        self.predictor = predictor
        self.lookahead_ms = float(lookahead_ms)
        self.load = load_ms or TierLoadTimes()
        self.capacities = dict(capacities or {})
        self.horizons = tuple(float(h) for h in horizons)
        self.min_idle_ms = self.lookahead_ms if min_idle_ms is None else min_idle_ms
        if demote_to not in (Tier.HOST, Tier.DISK):
            raise ValueError("demote_to must be HOST or DISK")
        self.demote_to = Tier(demote_to)
        self.stage_overdue = stage_overdue
        self.demote_idle = demote_idle  # False: never demote; eviction uses the predictions
        self.default_size_bytes = default_size_bytes
        self.metrics = PrefetchMetrics()
        self.sizes: dict[AdapterKey, int] = {}
        self._last: dict[AdapterKey, float] = {}
        self._forecast: dict[AdapterKey, float] = {}
        self._outstanding: dict[AdapterKey, tuple[Tier, int]] = {}
        self._promoted: dict[AdapterKey, Tier] = {}  # highest tier promoted to since arrival
        self._due: list[tuple[float, int, AdapterKey]] = []
        self._due_at: dict[AdapterKey, float] = {}
        self._seq = itertools.count()

    def set_size(self, key: AdapterKey, size_bytes: int) -> None:
        self.sizes[key] = max(0, int(size_bytes))

    def on_arrival(self, key: AdapterKey, t_ms: float) -> None:
        """A request for ``key`` arrived: score the outstanding prefetch and the forecast."""
        forecast = self._forecast.pop(key, None)
        if forecast is not None:
            self.metrics.forecasts += 1
            self.metrics.abs_error_ms_sum += abs(t_ms - forecast)
        hit = self._outstanding.pop(key, None)
        if hit is not None:
            self.metrics.hits += 1
            if hit[0] == Tier.GPU:
                self.metrics.cold_starts_avoided += 1
        self._promoted.pop(key, None)
        self.predictor.observe(key, t_ms)
        self._last[key] = max(t_ms, self._last.get(key, t_ms))
        self._schedule(key, t_ms)

    def on_evicted(self, key: AdapterKey) -> None:
        """The executor evicted ``key``: an unused prefetch of it was wasted, and that eviction
        stands (the adapter is not promoted again to that tier before its next arrival). The
        adapter is planned again at the next :meth:`plan`, so one evicted without a prefetch
        can be brought back ahead of its predicted arrival."""
        self._waste(key)
        self._due_at[key] = -math.inf
        heapq.heappush(self._due, (-math.inf, next(self._seq), key))

    def declined(self, key: AdapterKey) -> None:
        """The executor did not carry out the last promote of ``key`` (no victim qualified):
        it is neither a prefetch nor a waste, and it is not retried before ``key``'s next
        arrival. Unknown keys are ignored."""
        out = self._outstanding.pop(key, None)
        if out is not None:
            self.metrics.prefetches -= 1
            self.metrics.prefetched_bytes -= out[1]
            self.metrics.declined += 1

    def next_arrival_ms(self, key: AdapterKey, now_ms: float) -> float | None:
        """The predicted next arrival of ``key`` used to rank eviction victims (None: none
        expected)."""
        return next_arrival_estimate(self.predictor, key, now_ms)

    def victim(
        self,
        resident: Iterable[AdapterKey],
        in_use: Callable[[AdapterKey], bool],
        now_ms: float,
        *,
        promote: TierCommand | None = None,
    ) -> AdapterKey | None:
        """Which of ``resident`` (least recently used first) leaves to make room: the idle one
        predicted farthest away. For ``promote`` (a prefetch) only an adapter expected later
        than ``lookahead_ms`` from now and later than the promoted one qualifies; None means
        decline the promote. For a demand load (``promote`` None), None only when every
        adapter is in use."""
        if promote is None:
            return predicted_victim(resident, in_use, self._estimate(now_ms), now_ms=now_ms)
        return predicted_victim(
            resident,
            in_use,
            self._estimate(now_ms),
            now_ms=now_ms,
            protect_ms=self.lookahead_ms,
            before_ms=promote.expected_ms,
        )

    def _estimate(self, now_ms: float) -> Callable[[AdapterKey], float | None]:
        predictor = self.predictor
        return lambda key: next_arrival_estimate(predictor, key, now_ms)

    def plan(
        self,
        now_ms: float,
        residency: Mapping[AdapterKey, Tier],
        *,
        locate: Callable[[AdapterKey], str | None] | None = None,
    ) -> list[TierCommand]:
        """Promote and demote commands for the adapters due by ``now_ms``.

        ``residency``: the tier each adapter sits in where its next request would go (missing:
        only in the object store). ``locate`` fills each command's executor id.
        """
        if not self.predictor.proactive:
            self._due.clear()
            self._due_at.clear()
            return []
        keys: list[AdapterKey] = []
        while self._due and self._due[0][0] <= now_ms:
            due, _, key = heapq.heappop(self._due)
            if self._due_at.get(key) == due:
                del self._due_at[key]
                keys.append(key)
        promotes: list[tuple[float, TierCommand]] = []
        demotes: list[TierCommand] = []
        for key, p in zip(keys, predict_many(self.predictor, keys, now_ms), strict=True):
            tier = Tier(residency.get(key, Tier.REMOTE))
            size = self.sizes.get(key, self.default_size_bytes)
            if p is not None and p > now_ms:
                self._forecast[key] = p
            t_left = math.inf if p is None else max(0.0, p - now_ms)
            target = self._target(t_left, tier, size)
            if target == Tier.GPU and (p is None or p <= now_ms) and self.stage_overdue:
                target = Tier.HOST  # "any moment" is no forecast: stage it, take no GPU slot
            where = locate(key) if locate is not None else None
            done = self._promoted.get(key)
            if target is not None and target < tier and (done is None or target < done):
                cmd = TierCommand(
                    key, where, target, "promote", "predicted arrival", size, expected_ms=p
                )
                promotes.append((t_left, cmd))
                tier = target
            elif (
                self.demote_idle
                and target is None
                and tier < self.demote_to
                and self._idle(key, now_ms)
            ):
                demotes.append(TierCommand(key, where, self.demote_to, "demote", "not expected"))
                tier = self.demote_to
            self._schedule(key, now_ms, p=p, tier=tier, size=size)
        out: list[TierCommand] = []
        taken: dict[Tier, int] = {}
        for _, cmd in sorted(promotes, key=lambda x: x[0]):
            cap = self.capacities.get(cmd.target)
            if cap is not None and taken.get(cmd.target, 0) >= cap:
                self._schedule(cmd.key, now_ms, p=None, tier=Tier.REMOTE, size=0, retry=True)
                continue
            taken[cmd.target] = taken.get(cmd.target, 0) + 1
            self._waste(cmd.key)  # a re-promote supersedes an unused one
            self._outstanding[cmd.key] = (cmd.target, cmd.size_bytes)
            self._promoted[cmd.key] = cmd.target
            self.metrics.prefetches += 1
            self.metrics.prefetched_bytes += cmd.size_bytes
            out.append(cmd)
        for cmd in demotes:
            self._waste(cmd.key)
            self.metrics.demotes += 1
            out.append(cmd)
        return out

    def close(self, now_ms: float) -> PrefetchMetrics:
        """End of a run: prefetches never used count as wasted."""
        for key in list(self._outstanding):
            self._waste(key)
        return self.metrics

    def tracked(self) -> Iterable[AdapterKey]:
        return self._last.keys()

    # --- internals ------------------------------------------------------------------------

    def horizon_ms(self, target: Tier, current: Tier, size_bytes: int) -> float:
        return self.horizons[target] * self.lookahead_ms + self.load.to_tier_ms(
            current, target, size_bytes
        )

    def _target(self, t_left: float, current: Tier, size: int) -> Tier | None:
        for tier in _UP_TIERS:
            if t_left <= self.horizon_ms(tier, max(current, tier), size):
                return tier
        return None

    def _idle(self, key: AdapterKey, now_ms: float) -> bool:
        last = self._last.get(key)
        return last is None or now_ms - last >= self.min_idle_ms

    def _waste(self, key: AdapterKey) -> None:
        out = self._outstanding.pop(key, None)
        if out is not None:
            self.metrics.wasted += 1
            self.metrics.wasted_bytes += out[1]

    def _schedule(
        self,
        key: AdapterKey,
        now_ms: float,
        *,
        p: float | None = math.nan,
        tier: Tier = Tier.GPU,
        size: int = 0,
        retry: bool = False,
    ) -> None:
        """When to look at ``key`` again (``p`` NaN: at once, after an arrival)."""
        if retry:
            due = now_ms + self.lookahead_ms / 4
        elif p is not None and math.isnan(p):
            due = now_ms
        else:
            cands = [self.predictor.stable_until(key, now_ms)]
            if p is not None:
                cands += [p - self.horizon_ms(t, tier, size) for t in _UP_TIERS if t < tier]
            if self.demote_idle and tier < self.demote_to:
                last = self._last.get(key)
                if last is not None:
                    cands.append(last + self.min_idle_ms)
            later = [c for c in cands if c > now_ms]
            if not later or (due := min(later)) == math.inf:
                self._due_at.pop(key, None)
                return
        self._due_at[key] = due
        heapq.heappush(self._due, (due, next(self._seq), key))
