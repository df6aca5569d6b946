"""The billing ledger: usage events in, exactly once and durably; acknowledgements out.

Data flows left to right::

    executors ─UsageBatch─▶ ledger ─▶ Redis (dedupe marker + totals + stream, one Lua call)
    executors ◀─UsageAck── ledger      (only after Redis has the event)

An event is acknowledged only once it is recorded, so a sender that hears nothing resends,
and a resent event is recognised by its id and not counted twice. Redis runs with an
append-only file, so an acknowledged event survives a restart. The ledger prices nothing
itself: each inference event's billed milliseconds come from
:func:`vajra.policies.billing.billed_gpu_ms` (rounded per request, before summing), and the
aggregates in :mod:`vajra.state.usage` are what invoices are priced from. A kill -9 of the
ledger loses nothing: what it had not recorded was not acknowledged, and is sent again.

``billing`` counts what was freshly recorded (``billed_ms_{kind}``, ``gradients``,
``events_{kind}``) for the ledger's Prometheus endpoint.
"""

from __future__ import annotations

import logging
from collections import Counter

import trio

from vajra import bus
from vajra.actors.base import stats_frames, wait_until
from vajra.bus.codec import DecodeError, decode, encode
from vajra.bus.messages import StatsRequest, UsageAck, UsageBatch, UsageEvent
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig
from vajra.errors import InvalidRequest, VajraError
from vajra.policies.billing import billed_gpu_ms
from vajra.state import ClusterState, OffLoop, UsageRecord

log = logging.getLogger("vajra.ledger")


class Ledger:
    name = "ledger"

    def __init__(self, cfg: VajraConfig, state: ClusterState) -> None:
        self.cfg = cfg
        self.state = state
        self.redis = OffLoop()  # Redis calls, off the event loop
        self.counters: Counter[str] = Counter()
        self.billing: Counter[str] = Counter()
        self.usage = state.usage.with_stream_maxlen(cfg.ledger.usage_stream_maxlen)
        self._ctx = bus.new_context()
        self.sock: ZSocket = open_socket(
            self._ctx, bus.ROUTER, high_water_mark=cfg.bus.high_water_mark, handover=True
        )
        self._busy = 0

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            address = self.sock.bind(self.cfg.cluster.ledger_address)
            task_status.started(address)
            await self._serve()
        finally:
            self.sock.close()
            self._ctx.term()

    async def drain(self) -> None:
        """Let the batch being written finish (bounded), so nothing is left half-recorded."""
        with trio.move_on_after(self.cfg.ledger.flush_timeout_s):
            await wait_until(lambda: not self._busy, poll_s=0.01)

    async def _serve(self) -> None:
        while True:
            batch = await self.sock.recv_batch(self.cfg.bus.recv_batch)
            events: list[tuple[bytes, UsageEvent]] = []
            for frames in batch:
                events += await self._on_frames(frames)
            if events:
                self._busy += 1
                try:
                    with trio.CancelScope(shield=True):
                        acks = await self._record(events)
                finally:
                    self._busy -= 1
                for sender, ids in acks.items():
                    await self.sock.send([sender, *encode(UsageAck(event_ids=ids))])

    async def _on_frames(self, frames: list[bytes]) -> list[tuple[bytes, UsageEvent]]:
        sender = frames[0]
        try:
            env = decode(frames[1:], max_body_bytes=self.cfg.bus.max_body_bytes)
        except DecodeError as exc:
            self.counters["malformed_frames"] += 1
            log.warning("dropped a malformed frame: %s", exc)
            return []
        msg = env.message
        if isinstance(msg, StatsRequest):
            await self.sock.send([sender, *stats_frames(msg.request_id, self.name, self.counters)])
            return []
        if not isinstance(msg, UsageBatch):
            self.counters["unexpected_kind"] += 1
            return []
        return [(sender, e) for e in msg.events]

    async def _record(self, events: list[tuple[bytes, UsageEvent]]) -> dict[bytes, list[str]]:
        """Record a batch in one round trip; returns the acknowledgements to send."""
        granularity = self.cfg.policies.billing_granularity_ms
        records = [
            UsageRecord(
                event_id=e.event_id,
                tenant_id=e.tenant_id,
                request_id=e.request_id,
                executor_id=e.executor_id,
                gpu_ms=e.gpu_ms,
                prompt_tokens=e.prompt_tokens,
                completion_tokens=e.completion_tokens,
                ts_ms=e.ts_unix_ms,
                adapter=e.adapter,
                adapter_version=e.adapter_version,
                kind=e.kind,
                gradients=e.gradients,
                billed_ms=billed_gpu_ms(e.gpu_ms, granularity) if e.kind == "inference" else 0,
            )
            for _, e in events
        ]
        try:
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                fresh = await self.redis.run(self.usage.record_many, records)
        except InvalidRequest as exc:
            # One bad event must not block the others: record them one by one.
            log.warning("usage batch refused (%s); recording one by one", exc)
            fresh = []
            for rec in records:
                try:
                    fresh.append(await self.redis.run(self.usage.record, rec))
                except InvalidRequest as bad:
                    self.counters["events_invalid"] += 1
                    log.error("usage event %s refused for good: %s", rec.event_id, bad)
                    fresh.append(False)  # acknowledged: resending cannot make it valid
                except VajraError as down:
                    log.warning("usage events not recorded yet: %s", down)
                    break  # the rest stay unacknowledged and come again
        except (VajraError, trio.TooSlowError) as exc:
            # Not acknowledged: the executors keep them in their outboxes and send again.
            self.counters["record_failed"] += len(records)
            log.warning("%d usage events not recorded yet: %s", len(records), exc)
            return {}
        acks: dict[bytes, list[str]] = {}
        for (sender, event), rec, is_new in zip(events, records, fresh, strict=False):
            self.counters["events_recorded" if is_new else "events_duplicate"] += 1
            if is_new:
                self.billing[f"events_{rec.kind}"] += 1
                self.billing[f"billed_ms_{rec.kind}"] += rec.billed_ms
                self.billing["gradients"] += rec.gradients
            acks.setdefault(sender, []).append(event.event_id)
        return acks
