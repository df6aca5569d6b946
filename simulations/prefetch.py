"""Prefetch (Algorithm 1) as the simulator drives it: :class:`vajra.policies.prefetch.Prefetcher`
and the predictors of :mod:`vajra.policies.predictors`, called unchanged.

``policy.prefetch`` picks the predictor: ``ewma``, ``histogram`` (Serverless in the Wild),
``lstm`` (:mod:`vajra.forecast.lstm`, when installed), ``keepalive`` (fixed ``keepalive_ms``:
the serverless baseline, run as a tier policy), or ``none``: reactive loading, where adapters
load on demand and leave by each executor's LRU (the ``LruReactive`` baseline, which plans
nothing, so the engine runs no prefetcher at all).

Each adapter's *home* is the executor its last request went to; the prefetcher sees the
adapter's tier there, and its commands are carried out there (a promote to GPU memory goes
through that executor's copy channel like any load). Load times the prefetcher learns are the
executors' own: every load reports its per-hop times (:meth:`SimPrefetch.on_load`).

``policy.eviction = "predicted"`` hands each executor's GPU victim choice to the prefetcher
(:meth:`Prefetcher.victim`): the idle adapter predicted farthest away leaves, and a promote
into a full GPU whose every candidate victim is needed sooner than the lookahead or than the
promoted adapter is declined. ``"lru"`` keeps the executors' own LRU.

``oracle`` is no predictor but the ceiling of one: it knows the true time of each adapter's next
request from the trace, for adapters it has seen (a first-ever request stays unknowable). With
``policy.oracle_resolution_ms`` > 0 it knows only the start of the slot (a minute, for the Azure
2019 trace, whose arrivals inside a minute are drawn at random by the loader) the request
falls in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from simulations.cluster import GPU, HOST, REMOTE, Executor, TierTimes
from simulations.config import SimConfig, SimConfigError
from vajra.policies.placement import AdapterKey, Tier
from vajra.policies.predictors import (
    EwmaPredictor,
    GapPredictor,
    HistogramPredictor,
    KeepAlivePredictor,
)
from vajra.policies.prefetch import Prefetcher, PrefetchMetrics, TierCommand, TierLoadTimes

if TYPE_CHECKING:
    from simulations.engine import Simulator


class _HomeResidency(Mapping[AdapterKey, Tier]):
    """Each adapter's tier on its home executor, computed when asked (no copy per plan)."""

    def __init__(self, owner: SimPrefetch) -> None:
        self._owner = owner

    def __getitem__(self, key: AdapterKey) -> Tier:
        adapter = self._owner.adapter_of[key]
        home = self._owner.home.get(adapter)
        if home is None:
            raise KeyError(key)
        return Tier(home.tier_of(adapter))

    def __iter__(self) -> Iterator[AdapterKey]:
        return (self._owner.keys[a] for a in self._owner.home)

    def __len__(self) -> int:
        return len(self._owner.home)


class OraclePredictor:
    """Knows every adapter's request times (the ceiling of a perfect predictor): the next
    request after the last one observed, for adapters observed at least once; None after an
    adapter's last request. Keys are the simulator's ``("tenant-N", "adapter-N")``."""

    proactive = True

    def __init__(self, resolution_ms: float = 0.0) -> None:
        self.resolution_ms = resolution_ms  # > 0: knows only the start of that slot of time
        self._times = np.zeros(0)
        self._span: dict[int, tuple[int, int]] = {}
        self._next: dict[AdapterKey, int] = {}  # key -> index of its next request in _times

    def load(self, t_ms: Any, source: Any) -> None:
        """Learn the trace (its ``t_ms`` and ``source`` columns) before the run."""
        order = np.argsort(source, kind="stable")
        src = np.asarray(source)[order]
        self._times = np.asarray(t_ms, dtype=np.float64)[order]
        starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]]).tolist() if len(src) else []
        ends = [*starts[1:], len(src)]
        self._span = {int(src[a]): (a, b) for a, b in zip(starts, ends, strict=True)}
        self._next.clear()

    @staticmethod
    def _adapter(key: AdapterKey) -> int:
        """The trace's adapter index in ``("tenant-N", "adapter-N")``; -1 for any other key."""
        tail = key[1].rpartition("-")[2]
        return int(tail) if tail.isdigit() else -1

    def observe(self, key: AdapterKey, t_ms: float) -> None:
        lo, hi = self._span.get(self._adapter(key), (0, 0))
        i = self._next.get(key, lo)
        times = self._times
        while i < hi and times[i] <= t_ms:
            i += 1
        self._next[key] = i

    def predict_next(self, key: AdapterKey, now_ms: float) -> float | None:
        i = self._next.get(key)
        if i is None or i >= self._span.get(self._adapter(key), (0, 0))[1]:
            return None
        t = float(self._times[i])
        if self.resolution_ms > 0:
            t -= t % self.resolution_ms  # the trace's own resolution: no finer knowledge
        return max(now_ms, t)

    def stable_until(self, key: AdapterKey, now_ms: float) -> float:
        return math.inf

    def forget(self, key: AdapterKey) -> None:
        self._next.pop(key, None)


def _predictor(cfg: SimConfig) -> Any:
    kind = cfg.policy.prefetch
    if kind == "oracle":
        return OraclePredictor(cfg.policy.oracle_resolution_ms)  # learns the trace in bind
    if kind == "ewma":
        return EwmaPredictor()
    if kind == "histogram":
        return HistogramPredictor()
    if kind == "gap":
        p = cfg.policy
        return GapPredictor(quantile=p.gap_quantile, resolution_ms=p.gap_resolution_ms)
    if kind == "keepalive":
        return KeepAlivePredictor(keepalive_ms=cfg.policy.keepalive_ms)
    if kind == "lstm":
        try:
            from vajra.forecast.lstm import LstmPredictor
        except ImportError as e:
            raise SimConfigError(f"[policy] prefetch = 'lstm': {e}") from e
        return LstmPredictor()
    raise SimConfigError(f"[policy] prefetch: no predictor {kind!r}")


class SimPrefetch:
    """Feeds arrivals, loads and evictions to a :class:`Prefetcher`; applies its commands."""

    def __init__(self, cfg: SimConfig, times: TierTimes) -> None:
        self.prefetcher = Prefetcher(
            _predictor(cfg),
            lookahead_ms=cfg.policy.lookahead_ms,
            load_ms=TierLoadTimes(),
            default_size_bytes=cfg.cluster.adapter_bytes,
            stage_overdue=cfg.policy.stage_overdue != 0,
            min_idle_ms=cfg.policy.min_idle_ms or None,
            demote_idle=cfg.policy.eviction != "predicted",
        )
        self.times = times
        self.keys: dict[int, AdapterKey] = {}
        self.adapter_of: dict[AdapterKey, int] = {}
        self.home: dict[int, Executor] = {}
        self.residency = _HomeResidency(self)
        self.predicted_eviction = cfg.policy.eviction == "predicted"

    def bind(self, sim: Simulator) -> None:
        """Called by the simulator once built: with predicted eviction each executor asks the
        prefetcher for its GPU victims; the oracle learns the trace."""
        if self.predicted_eviction:
            for ex in sim.executors:
                ex.pick_victim = self.gpu_victim
        predictor = self.prefetcher.predictor
        if isinstance(predictor, OraclePredictor):
            predictor.load(sim.trace.t_ms, sim.trace.source)

    def gpu_victim(
        self, ex: Executor, incoming: int, now_ms: float, promote: TierCommand | None = None
    ) -> int | None:
        """The idle adapter to evict from ``ex``'s GPU memory (None: none qualifies)."""
        key, in_use = self.key, ex.in_use
        by_key = {key(a): a for a in ex.gpu if a != incoming}
        victim = self.prefetcher.victim(
            by_key, lambda k: by_key[k] in in_use, now_ms, promote=promote
        )
        return None if victim is None else by_key[victim]

    def start_measuring(self) -> None:
        """The warm-up ended: prefetch figures restart from zero."""
        self.prefetcher.metrics = PrefetchMetrics()

    def key(self, adapter: int) -> AdapterKey:
        key = self.keys.get(adapter)
        if key is None:
            key = self.keys[adapter] = (f"tenant-{adapter}", f"adapter-{adapter}")
            self.adapter_of[key] = adapter
        return key

    def on_arrival(self, adapter: int, ex: Executor, now_ms: float) -> None:
        self.home[adapter] = ex
        self.prefetcher.on_arrival(self.key(adapter), now_ms)

    def on_load(self, src_tier: int, nbytes: int, ms: float) -> None:
        """A load from ``src_tier`` into GPU memory took ``ms``: report each hop's share."""
        load = self.prefetcher.load
        t = self.times.load_ms
        if src_tier >= HOST:
            load.observe_load(Tier.GPU, nbytes, t[HOST])
        for hop in range(HOST, min(src_tier, REMOTE) + 1):
            if hop < src_tier:
                load.observe_load(Tier(hop), nbytes, max(1e-6, t[hop + 1] - t[hop]))

    def on_evicted(self, adapter: int, ex: Executor, tier: int) -> None:
        """An executor's LRU moved ``adapter`` out of GPU memory at its home."""
        if tier > GPU and self.home.get(adapter) is ex:
            key = self.keys.get(adapter)
            if key is not None:
                self.prefetcher.on_evicted(key)

    def plan(self, sim: Simulator, now_ms: float) -> None:
        for cmd in self.prefetcher.plan(now_ms, self.residency):
            adapter = self.adapter_of[cmd.key]
            ex = self.home.get(adapter)
            if ex is None:
                continue
            if cmd.action == "promote":
                if (
                    self.predicted_eviction
                    and cmd.target == Tier.GPU
                    and adapter not in ex.gpu
                    and len(ex.gpu) >= ex.gpu_slots
                    and self.gpu_victim(ex, adapter, now_ms, cmd) is None
                ):
                    self.prefetcher.declined(cmd.key)  # every victim is needed sooner
                    continue
                sim.promote(ex, adapter, int(cmd.target), now_ms)
            else:
                sim.demote(ex, adapter, int(cmd.target))

    def report(self, now_ms: float) -> dict[str, Any]:
        metrics: dict[str, Any] = dict(self.prefetcher.close(now_ms).as_dict())
        metrics["predictor"] = type(self.prefetcher.predictor).__name__
        return metrics


def build_prefetch(cfg: SimConfig) -> SimPrefetch | None:
    """The config's prefetch policy, or None for reactive loading."""
    if cfg.policy.prefetch == "none":
        return None
    return SimPrefetch(cfg, TierTimes.from_cluster(cfg.cluster))
