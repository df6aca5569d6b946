"""The prefetch predictor: learns each adapter's request pattern from the request events.

Data flows left to right::

    scheduler ═RequestEvents═▶ predictor ─▶ Redis (per-adapter request counts, last seen)

For now it records: a bounded in-memory history of arrival times per adapter (what the
forecast of Algorithm 1 will read) and per-adapter totals flushed to Redis once a second.
Telling executors which tier each adapter belongs in comes with the adapter tiers.
"""

from __future__ import annotations

import logging
from collections import Counter, deque

import trio

from vajra import bus
from vajra.bus.codec import DecodeError, decode
from vajra.bus.messages import RequestEvent, RequestEvents
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig
from vajra.errors import VajraError
from vajra.state import ClusterState, OffLoop

log = logging.getLogger("vajra.predictor")

BASE_MODEL_KEY = "__base__"


class Predictor:
    name = "predictor"

    def __init__(self, cfg: VajraConfig, state: ClusterState) -> None:
        self.cfg = cfg
        self.state = state
        self.redis = OffLoop()  # Redis calls, off the event loop
        self.counters: Counter[str] = Counter()
        self.history: dict[str, deque[int]] = {}
        self._unflushed: Counter[str] = Counter()
        self._latest: dict[str, int] = {}
        self._ctx = bus.new_context()
        self.events: ZSocket = open_socket(
            self._ctx, bus.SUB, high_water_mark=cfg.bus.high_water_mark
        )

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            self.events.subscribe(b"")
            self.events.connect(self.cfg.cluster.events_address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive)
                nursery.start_soon(self._flush_loop)
                task_status.started(self.cfg.cluster.events_address)
        finally:
            self.events.close()
            self._ctx.term()

    async def drain(self) -> None:
        with trio.move_on_after(self.cfg.ledger.flush_timeout_s):
            await self._flush()

    def record(self, event: RequestEvent) -> None:
        key = event.adapter or BASE_MODEL_KEY
        hist = self.history.get(key)
        if hist is None:
            hist = self.history[key] = deque(maxlen=self.cfg.predictor.history_per_adapter)
        hist.append(event.ts_unix_ms)
        self._unflushed[key] += 1
        self._latest[key] = max(self._latest.get(key, 0), event.ts_unix_ms)
        self.counters["events"] += 1

    async def _receive(self) -> None:
        while True:
            for frames in await self.events.recv_batch(self.cfg.bus.recv_batch):
                try:
                    env = decode(frames)
                except DecodeError:
                    self.counters["malformed_events"] += 1
                    continue
                if isinstance(env.message, RequestEvents):
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
