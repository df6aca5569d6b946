"""The executor's usage outbox: what each request or training step computed, on disk and kept
until the ledger acknowledges it.

Data flows left to right::

    step loop ─record─▶ journal (disk) ─▶ outbox ─UsageBatch─▶ ledger ─UsageAck─▶ outbox, journal

Every event is written to the executor's journal (:mod:`vajra.actors.usage_journal`) before
it is sent, and fsync'd in batches (each resend tick and at drain); an acknowledgement is
journaled too. So is the progress of every stream, before each chunk it is sent
(:meth:`UsageOutbox.progress`): a stream whose executor is killed mid-generation is billed,
once a new incarnation recovers the journal, for what it computed up to its last chunk. A
request that is not streamed sends nothing before it ends; if its executor dies first, the
scheduler places it again (or its client gets an error), and what the dead executor computed
for it is not billed (the cost of our crash, as for a training step computed again).

A new incarnation of the same executor id takes over the unacknowledged events of the earlier
ones (:meth:`UsageOutbox.resend` starts by recovering them) and sends them again. So no event
is ever dropped: a kill -9 between compute and acknowledgement loses nothing (the event was
written before it was sent), and the ledger counts a resent event once (its ``event_id``).

Event ids: inference ``{executor}.{incarnation}.{request_id}`` (request ids are unique across
gateways and their restarts); training ``train.{job_id}.{step}``, deliberately *not* tied to
the incarnation. A job resumed after a crash may compute a step again; the tenant ordered one
optimizer step, and the recomputation is the cost of our crash, so the step is billed once (the
first record of it wins). It also makes a resumed job's resends idempotent.

Backpressure instead of loss: past ``executor.max_usage_outbox`` unacknowledged events (a
ledger down for long) the executor keeps every event (in memory and on disk) and refuses new
work as overloaded (:meth:`UsageOutbox.backlogged`, read by the intake) until acks come back.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import msgspec
import trio

from vajra.actors.base import now_ms
from vajra.actors.usage_journal import Progress, UsageJournal
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
#: Lines in a journal segment past which it is rewritten with only the unacknowledged events
#: (when those are at most a tenth of it, so rewriting is cheap).
ROTATE_LINES = 200_000
#: Bytes in a journal segment past which it is rewritten the same way (progress lines are
#: long: one per loop pass, naming every stream running).
ROTATE_BYTES = 64 << 20


def journal_dir(cfg: VajraConfig, executor_id: str) -> Path:
    """Where executor ``executor_id`` keeps its usage journal."""
    base = cfg.executor.usage_journal_dir
    root = Path(base).expanduser() if base else cfg.cluster.home_path / "usage"
    return root / executor_id


def adapter_name(adapter: str | None) -> str:
    """The adapter's name from the caller's ``NAME`` or ``NAME@VERSION`` ("" for none)."""
    return (adapter or "").split("@", 1)[0]


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
        # Streams with progress journaled: event id -> (first record, latest counts, when).
        self._running: dict[str, tuple[UsageEvent, Progress, int]] = {}
        self._unsynced = False
        self.journal = UsageJournal(
            journal_dir(cfg, executor_id), incarnation, keep=cfg.executor.keep_usage_journals
        )
        # Opening creates a directory and an empty file: cheap enough for the constructor.
        self.journal.open()

    def backlogged(self) -> bool:
        """Too many events unacknowledged (``executor.max_usage_outbox``): take no new work."""
        return len(self.pending) >= self.cfg.executor.max_usage_outbox

    def record(self, work: InferWork, out: StepOutput) -> None:
        """Keep what ``work`` computed (its final output, or what it had computed when it was
        cut short) until the ledger acknowledges it. OSError if the journal cannot be written."""
        event = self._inference_event(work, out, now_ms())
        self._running.pop(event.event_id, None)
        self._keep(event)

    def progress(self, rows: list[tuple[InferWork, StepOutput]]) -> None:
        """Journal what running streams computed so far (each row: the request and its latest
        output), before the chunks carrying it are sent; one write for all. Not fsync'd (a
        kill -9 keeps it; a machine that crashes takes the streams' clients' chunks with it
        too, at worst unbilled). OSError if the journal cannot be written."""
        if not rows:
            return
        now = now_ms()
        started: list[UsageEvent] = []
        counts: list[Progress] = []
        running = self._running
        for work, out in rows:
            event_id = self._event_id(work.request_id)
            count = (event_id, out.compute_ms, out.prompt_tokens, out.completion_tokens)
            seen = running.get(event_id)
            if seen is None:
                event = self._inference_event(work, out, now)
                started.append(event)
            else:
                event = seen[0]
                counts.append(count)
            running[event_id] = (event, count, now)
        self.journal.progress(started, counts, now)

    def forget(self, request_id: str) -> None:
        """The request ended without an event (nothing computed): drop its progress."""
        self._running.pop(self._event_id(request_id), None)

    def _event_id(self, request_id: str) -> str:
        return f"{self.executor_id}.{self.incarnation}.{request_id}"

    def _inference_event(self, work: InferWork, out: StepOutput, ts_unix_ms: int) -> UsageEvent:
        return UsageEvent(
            event_id=self._event_id(work.request_id),
            tenant_id=work.tenant_id,
            request_id=work.request_id,
            executor_id=self.executor_id,
            gpu_ms=out.compute_ms,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            ts_unix_ms=ts_unix_ms,
            adapter=adapter_name(work.adapter),
            adapter_version=work.adapter_version or 0,
            kind="inference",
        )

    def record_training(
        self,
        *,
        tenant_id: str,
        adapter: str,
        version: int,
        job_id: str,
        step: int,
        gpu_ms: float,
        gradients: int,
        tokens: int,
    ) -> None:
        """Keep one optimizer step of training job ``job_id`` (``gradients``: see
        :func:`vajra.policies.billing.gradients_per_step`; ``tokens``: tokens trained on).
        The id is ``train.{job_id}.{step}``: a step recorded twice is billed once (module
        docstring). OSError if the journal cannot be written."""
        self._keep(
            UsageEvent(
                event_id=f"train.{job_id}.{step}",
                tenant_id=tenant_id,
                request_id=f"{job_id}.{step}",
                executor_id=self.executor_id,
                gpu_ms=gpu_ms,
                prompt_tokens=tokens,
                completion_tokens=0,
                ts_unix_ms=now_ms(),
                adapter=adapter_name(adapter),
                adapter_version=version,
                kind="training",
                gradients=gradients,
            )
        )

    def _keep(self, event: UsageEvent) -> None:
        self.journal.append((event,))  # on disk (the kernel's) before anything is sent
        self._unsynced = True
        if event.event_id in self.pending:
            self.counters["usage_rerecorded"] += 1
            return
        if self.backlogged():
            self.counters["usage_outbox_backlogged"] += 1
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
        """Forget acknowledged events (and journal the acks); runs until cancelled."""
        while True:
            for frames in await self.ledger.recv_batch(self.cfg.bus.recv_batch):
                try:
                    env = decode(frames)
                except DecodeError:
                    self.counters["malformed_ledger_frames"] += 1
                    continue
                if isinstance(env.message, UsageAck):
                    acked = [e for e in env.message.event_ids if self.pending.pop(e, None)]
                    self.journal.ack(acked)

    async def resend(self) -> None:
        """Take over earlier incarnations' unacknowledged events, then every
        ``usage_resend_s``: fsync the journal, resend what is unacknowledged that long and
        compact the journal when it grew large. Runs until cancelled."""
        recovered = await trio.to_thread.run_sync(self.journal.recover)
        if recovered:
            log.warning(
                "executor %s: resending %d usage events of an earlier incarnation",
                self.executor_id,
                len(recovered),
            )
            self.counters["usage_recovered"] += len(recovered)
            now = trio.current_time()
            for event in recovered:
                if event.event_id not in self.pending:
                    self.pending[event.event_id] = (event, now)
                    self._unsent.append(event)
            self.send(force=True)
        while True:
            await trio.sleep(self.cfg.executor.usage_resend_s)
            await self.sync()
            await self._flush(force=False)
            if self._journal_large() and len(self.pending) * 10 <= ROTATE_LINES:
                pending = [e for e, _ in self.pending.values()]
                self.journal.rotate(pending, self._running_events())

    def _running_events(self) -> list[UsageEvent]:
        """The streams journaled as running, each as the event its latest counts would bill."""
        return [
            msgspec.structs.replace(
                event,
                gpu_ms=gpu_ms,
                prompt_tokens=prompt,
                completion_tokens=completion,
                ts_unix_ms=ts,
            )
            for event, (_, gpu_ms, prompt, completion), ts in self._running.values()
        ]

    def _journal_large(self) -> bool:
        return self.journal.lines > ROTATE_LINES or self.journal.bytes > ROTATE_BYTES

    async def sync(self) -> None:
        """fsync the journal (in a worker thread) if anything was written since the last."""
        if self._unsynced:
            self._unsynced = False
            await trio.to_thread.run_sync(self.journal.sync)

    async def drain(self) -> None:
        """Send everything and wait for the acks, at most ``ledger.flush_timeout_s``; what is
        left stays in the journal for the next incarnation. Shielded: the journal is always
        fsync'd and closed."""
        with trio.CancelScope(shield=True):
            await self.sync()
        self.send(force=True)
        with trio.move_on_after(self.cfg.ledger.flush_timeout_s):
            while self.pending:
                await self._flush(force=True)
                await trio.sleep(0.1)
        if self.pending:
            log.error(
                "executor %s exits with %d usage events unacknowledged (kept in its journal)",
                self.executor_id,
                len(self.pending),
            )
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.journal.close)

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
