"""The executor's usage outbox: what each request computed, kept until the ledger acknowledges.

Data flows left to right::

    step loop ─record─▶ outbox ─UsageBatch─▶ ledger ─UsageAck─▶ outbox (forgets those events)

An event's id derives from the executor, its incarnation and the request, so a resent event is
counted once by the ledger. Events not acknowledged within ``usage_resend_s`` are sent again;
past ``max_usage_outbox`` events (a ledger down for long) new ones are dropped, counted and
logged.
"""

from __future__ import annotations

import logging
from collections import Counter

import trio

from vajra.actors.base import now_ms
from vajra.bus.codec import DecodeError, decode, encode
from vajra.bus.messages import InferWork, UsageAck, UsageBatch, UsageEvent
from vajra.bus.zsocket import ZSocket
from vajra.config import VajraConfig
from vajra.gpu.interface import StepOutput

log = logging.getLogger("vajra.executor")

#: Recorded events that make a batch worth sending before the next forced flush.
SEND_BATCH = 256
#: Events per UsageBatch when resending.
RESEND_BATCH = 512


class UsageOutbox:
    """Usage events of one executor incarnation, from recording to the ledger's ack."""

    def __init__(
        self,
        cfg: VajraConfig,
        ledger: ZSocket,
        counters: Counter[str],
        *,
        executor_id: str,
        incarnation: str,
    ) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.counters = counters
        self.executor_id = executor_id
        self.incarnation = incarnation
        self.pending: dict[str, tuple[UsageEvent, float]] = {}  # event id -> (event, sent at)
        self._unsent: list[UsageEvent] = []

    def record(self, work: InferWork, out: StepOutput) -> None:
        """Keep what ``work`` computed (its final output) until the ledger acknowledges it."""
        event = UsageEvent(
            event_id=f"{self.executor_id}.{self.incarnation}.{work.request_id}",
            tenant_id=work.tenant_id,
            request_id=work.request_id,
            executor_id=self.executor_id,
            gpu_ms=out.compute_ms,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            ts_unix_ms=now_ms(),
        )
        if len(self.pending) >= self.cfg.executor.max_usage_outbox:
            self.counters["usage_outbox_full"] += 1
            log.error("usage outbox full (%d events); is the ledger down?", len(self.pending))
            return
        self.pending[event.event_id] = (event, trio.current_time())
        self._unsent.append(event)

    def send(self, *, force: bool = False) -> None:
        """Send recorded usage as one batch once enough has gathered (or when ``force``).

        Batches of up to :data:`SEND_BATCH` events keep the ledger's per-message costs low;
        the load-report tick forces a flush, so usage reaches the ledger within a tenth of a
        second. What is not sent (a full socket) stays pending and :meth:`resend` sends it.
        """
        if self._unsent and (force or len(self._unsent) >= SEND_BATCH):
            self.ledger.send_nowait(encode(UsageBatch(self._unsent)))
            self._unsent = []

    async def receive_acks(self) -> None:
        """Forget acknowledged events; runs until cancelled."""
        while True:
            for frames in await self.ledger.recv_batch(self.cfg.bus.recv_batch):
                try:
                    env = decode(frames)
                except DecodeError:
                    self.counters["malformed_ledger_frames"] += 1
                    continue
                if isinstance(env.message, UsageAck):
                    for eid in env.message.event_ids:
                        self.pending.pop(eid, None)

    async def resend(self) -> None:
        """Resend events left unacknowledged for ``usage_resend_s``; runs until cancelled."""
        while True:
            await trio.sleep(self.cfg.executor.usage_resend_s)
            await self._flush(force=False)

    async def drain(self) -> None:
        """Send everything and wait for the acks, at most ``ledger.flush_timeout_s``."""
        self.send(force=True)
        with trio.move_on_after(self.cfg.ledger.flush_timeout_s):
            while self.pending:
                await self._flush(force=True)
                await trio.sleep(0.1)
        if self.pending:
            log.error(
                "executor %s exits with %d usage events unacknowledged",
                self.executor_id,
                len(self.pending),
            )

    async def _flush(self, *, force: bool) -> None:
        now = trio.current_time()
        cutoff = now - self.cfg.executor.usage_resend_s
        due = [e for e, sent_at in self.pending.values() if force or sent_at <= cutoff]
        for i in range(0, len(due), RESEND_BATCH):
            chunk = due[i : i + RESEND_BATCH]
            if not self.ledger.send_nowait(encode(UsageBatch(chunk))):
                return
            for event in chunk:
                self.pending[event.event_id] = (event, now)
            self.counters["usage_resent"] += len(chunk)
