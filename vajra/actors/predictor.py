"""The prefetch predictor: learns each adapter's request pattern and moves it between tiers.

Data flows left to right::

    scheduler ═RequestEvents═▶ predictor ─▶ Redis (per-adapter request counts, last seen)
    predictor ─AdapterTierCommand─▶ scheduler ─▶ the executor placement would pick
    predictor ─AdapterForecasts─▶ scheduler ─▶ each executor, for the adapters in its GPU memory

Every request event is keyed by (tenant, adapter digest) — never by adapter name — and feeds:

* a bounded in-memory history of arrival times per key and per-key totals flushed to Redis
  once a second (``"{tenant}/{digest}"``; base-model requests: ``"{tenant}/__base__"``);
* the configured arrival predictor (``predictor.kind``: histogram, gap, ewma, lstm, keepalive
  or lru; see :mod:`vajra.policies.predictors` and :mod:`vajra.forecast.lstm`) and the
  :class:`~vajra.policies.prefetch.Prefetcher` (Algorithm 1), which plans every
  ``predictor.plan_interval_s`` with ``policies.prefetch_lookahead_ms`` and the executors'
  measured load times (carried on the request events).

Tier commands go to the scheduler with no executor named: it sends a promote where placement
would send the tenant's next request for that adapter, and a demote to every executor holding
the adapter above the target tier. The predictor's residency view is its own bookkeeping: an
adapter just requested is in GPU memory, one just commanded sits where it was sent; an LRU
eviction it did not order is not seen (the adapter then is simply reloaded on demand).

Forecasts: every ``FORECAST_EVERY`` plan ticks the predicted next arrival of each adapter in
GPU memory goes out (:meth:`Predictor.forecasts`); an executor that must evict takes the one
expected farthest away (:mod:`vajra.actors.adapter_forecasts`) — the same ranking the
simulator's ``policy.eviction = "predicted"`` uses (docs/simulations.md).

Errors: a malformed event is counted and dropped; a Redis failure keeps the counts for the
next flush; a full scheduler socket drops that plan's commands (counted) — prefetch is advice.
On cancellation the flush in :meth:`drain` is bounded by ``ledger.flush_timeout_s``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from collections import Counter, deque

import trio

from vajra import bus
from vajra.actors.base import now_ms
from vajra.bus.codec import DecodeError, decode, encode
from vajra.bus.messages import (
    AdapterForecasts,
    AdapterTierCommand,
    Message,
    RequestEvent,
    RequestEvents,
)
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import ConfigError, VajraConfig
from vajra.errors import VajraError
from vajra.policies.placement import AdapterKey, Tier
from vajra.policies.predictors import (
    ArrivalPredictor,
    EwmaPredictor,
    GapPredictor,
    HistogramPredictor,
    KeepAlivePredictor,
    LruReactive,
)
from vajra.policies.prefetch import Prefetcher, TierCommand
from vajra.state import ClusterState, OffLoop

log = logging.getLogger("vajra.predictor")

BASE_MODEL_KEY = "__base__"
PREDICTORS = ("histogram", "gap", "ewma", "lstm", "keepalive", "lru")
_TIER_NAME = {Tier.GPU: "gpu", Tier.HOST: "host", Tier.DISK: "disk"}
_NAME_TIER = {v: k for k, v in _TIER_NAME.items()}
_ASSUMED_BYTES = 16 << 20  # an adapter's size until the first request that says one
FORECAST_EVERY = 4  # plan ticks between two AdapterForecasts (executors: fresh for 4 ticks)
FORECAST_LIMIT = 4_096  # adapters one AdapterForecasts carries at most


def make_predictor(cfg: VajraConfig) -> ArrivalPredictor:
    """The arrival predictor ``predictor.kind`` names; ConfigError for an unknown kind."""
    p = cfg.predictor
    if p.kind == "histogram":
        return HistogramPredictor(fallback_keepalive_ms=p.keepalive_ms)
    if p.kind == "gap":
        return GapPredictor(fallback_keepalive_ms=p.keepalive_ms)
    if p.kind == "ewma":
        return EwmaPredictor()
    if p.kind == "keepalive":
        return KeepAlivePredictor(keepalive_ms=p.keepalive_ms)
    if p.kind == "lru":
        return LruReactive()
    if p.kind == "lstm":
        from vajra.forecast.lstm import LstmPredictor

        return LstmPredictor(bin_ms=p.lstm_bin_ms)
    raise ConfigError(f"predictor.kind must be one of {', '.join(PREDICTORS)}, not {p.kind!r}")


def command_for(cmd: TierCommand, object_key: str) -> AdapterTierCommand:
    """The wire command for a plan's decision (a demote to the disk drops host and GPU)."""
    if cmd.action == "promote":
        tier = _TIER_NAME[cmd.target]
    else:
        tier = _TIER_NAME[Tier(max(Tier.GPU, cmd.target - 1))]
    return AdapterTierCommand(
        executor_id=cmd.executor_id or "",
        adapter_digest=cmd.key[1],
        adapter_object_key=object_key,
        tier=tier,
        action=cmd.action,
        tenant_id=cmd.key[0],
        expected_ms=cmd.expected_ms if cmd.action == "promote" else None,
    )


class Predictor:
    name = "predictor"

    def __init__(self, cfg: VajraConfig, state: ClusterState) -> None:
        self.cfg = cfg
        self.state = state
        self.redis = OffLoop()  # Redis calls, off the event loop
        self.counters: Counter[str] = Counter()
        self.history: dict[AdapterKey, deque[int]] = {}
        self._unflushed: Counter[str] = Counter()
        self._latest: dict[str, int] = {}
        self.predictor = make_predictor(cfg)
        self.prefetcher = Prefetcher(
            self.predictor,
            lookahead_ms=cfg.policies.prefetch_lookahead_ms,
            default_size_bytes=_ASSUMED_BYTES,
        )
        self.residency: dict[AdapterKey, Tier] = {}
        self.object_keys: dict[AdapterKey, str] = {}
        self._sized = 0  # requests that said their adapter's size
        self._mean_bytes = 0.0  # ... and the mean of those sizes
        self._ctx = bus.new_context()
        hwm = cfg.bus.high_water_mark
        self.events: ZSocket = open_socket(self._ctx, bus.SUB, high_water_mark=hwm)
        self.scheduler: ZSocket = open_socket(self._ctx, bus.DEALER, high_water_mark=hwm)

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            self.events.subscribe(b"")
            self.events.connect(self.cfg.cluster.events_address)
            self.scheduler.connect(self.cfg.cluster.scheduler_address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive)
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._plan_loop)
                task_status.started(self.cfg.cluster.events_address)
        finally:
            self.events.close()
            self.scheduler.close()
            self._ctx.term()

    async def drain(self) -> None:
        with trio.move_on_after(self.cfg.ledger.flush_timeout_s):
            await self._flush()

    def record(self, event: RequestEvent) -> None:
        digest = event.adapter_digest or ""
        key = (event.tenant_id, digest)
        hist = self.history.get(key)
        if hist is None:
            hist = self.history[key] = deque(maxlen=self.cfg.predictor.history_per_adapter)
        hist.append(event.ts_unix_ms)
        name = f"{event.tenant_id}/{digest or BASE_MODEL_KEY}"
        self._unflushed[name] += 1
        self._latest[name] = max(self._latest.get(name, 0), event.ts_unix_ms)
        self.counters["events"] += 1
        if digest and event.adapter_bytes > 0:
            self.prefetcher.set_size(key, event.adapter_bytes)
            self._sized += 1
            self._mean_bytes += (event.adapter_bytes - self._mean_bytes) / self._sized
        if digest and event.adapter_object_key:
            self.object_keys[key] = event.adapter_object_key
            self.prefetcher.on_arrival(key, float(event.ts_unix_ms))
            self.residency[key] = Tier.GPU  # the request loads it

    def observe_load_times(self, tier_load_ms: dict[str, float]) -> None:
        """The executors' mean load time into each tier: a mean over the adapters they loaded,
        so it is taken as the time for an adapter of the mean size requested (the sizes the
        requests carry), and scaled per adapter by its own size when plans are made."""
        size = round(self._mean_bytes) if self._sized else _ASSUMED_BYTES
        for name, ms in tier_load_ms.items():
            tier = _NAME_TIER.get(name)
            if tier is not None:
                self.prefetcher.load.observe_load(tier, size, ms)

    def plan(self, now: float) -> list[AdapterTierCommand]:
        """This interval's tier commands (the residency view moves with them)."""
        out = []
        for cmd in self.prefetcher.plan(now, self.residency):
            object_key = self.object_keys.get(cmd.key)
            if object_key is None:
                continue
            out.append(command_for(cmd, object_key))
            self.residency[cmd.key] = cmd.target
            self.counters[f"tier_{cmd.action}"] += 1
        return out

    def forecasts(self, now: float) -> AdapterForecasts | None:
        """The predicted next arrival of each adapter counted as in GPU memory, by digest (the
        soonest over the tenants that share it; NaN: none expected); at most
        ``FORECAST_LIMIT``, the most recently requested. None when there is none."""
        keys = [k for k, tier in self.residency.items() if tier == Tier.GPU and k[1]]
        if len(keys) > FORECAST_LIMIT:
            keys = heapq.nlargest(FORECAST_LIMIT, keys, key=lambda k: self._last_arrival(k))
        soonest: dict[str, float] = {}
        for key in keys:
            at = self.prefetcher.next_arrival_ms(key, now)
            value = math.nan if at is None else float(at)
            old = soonest.get(key[1])
            if old is None or math.isnan(old) or (not math.isnan(value) and value < old):
                soonest[key[1]] = value
        if not soonest:
            return None
        return AdapterForecasts(list(soonest), list(soonest.values()), int(now))

    def _last_arrival(self, key: AdapterKey) -> int:
        hist = self.history.get(key)
        return hist[-1] if hist else 0

    async def _plan_loop(self) -> None:
        for tick in itertools.count(1):
            await trio.sleep(self.cfg.predictor.plan_interval_s)
            now = float(now_ms())
            msgs: list[Message] = list(self.plan(now))
            if tick % FORECAST_EVERY == 0 and (forecast := self.forecasts(now)) is not None:
                msgs.append(forecast)
            for msg in msgs:
                if not self.scheduler.send_nowait(encode(msg)):
                    self.counters[f"{msg.KIND}_dropped"] += 1

    async def _receive(self) -> None:
        while True:
            for frames in await self.events.recv_batch(self.cfg.bus.recv_batch):
                try:
                    env = decode(frames)
                except DecodeError:
                    self.counters["malformed_events"] += 1
                    continue
                if isinstance(env.message, RequestEvents):
                    self.observe_load_times(env.message.tier_load_ms)
                    for event in env.message.events:
                        self.record(event)

    async def _flush_loop(self) -> None:
        while True:
            await trio.sleep(self.cfg.predictor.flush_interval_s)
            await self._flush()

    async def _flush(self) -> None:
        """Write per-adapter counts since the last flush; kept for the next try on failure."""
        pending, self._unflushed = self._unflushed, Counter()
        latest, self._latest = self._latest, {}
        for i, (adapter, count) in enumerate(pending.items()):
            try:
                await self.redis.run(self.state.events.record, adapter, latest[adapter], count)
            except VajraError as exc:
                log.warning("request events not flushed: %s", exc)
                for a, c in list(pending.items())[i:]:
                    self._unflushed[a] += c
                    self._latest[a] = max(self._latest.get(a, 0), latest[a])
                return
