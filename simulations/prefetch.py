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
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from simulations.cluster import GPU, HOST, REMOTE, Executor, TierTimes
from simulations.config import SimConfig, SimConfigError
from vajra.policies.placement import AdapterKey, Tier
from vajra.policies.predictors import EwmaPredictor, HistogramPredictor, KeepAlivePredictor
from vajra.policies.prefetch import Prefetcher, TierLoadTimes

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


def _predictor(cfg: SimConfig) -> Any:
    kind = cfg.policy.prefetch
    if kind == "ewma":
        return EwmaPredictor()
    if kind == "histogram":
        return HistogramPredictor()
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
        )
        self.times = times
        self.keys: dict[int, AdapterKey] = {}
        self.adapter_of: dict[AdapterKey, int] = {}
        self.home: dict[int, Executor] = {}
        self.residency = _HomeResidency(self)

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
