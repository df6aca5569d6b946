"""What each optimizer step of a training job leaves behind: its bill, its progress, its checkpoint.

The job runner (:mod:`vajra.actors.executor_jobs`) hands :class:`StepBook` the reports that
the model thread's micro-steps produce. Per optimizer step (a report whose step number moved
on; micro-steps inside one are billed with it) the book records the usage event
(``UsageOutbox.record_training``, exactly once per step and job: steps redone after a resume
carry the same idempotency id and are not counted again in the job's totals), writes the
job's progress with its cost so far, and marks a checkpoint due every ``checkpoint_every``
steps. :meth:`StepBook.checkpoint` stores ``checkpoints/<tenant>/<job>/<step>.safetensors``
and records it, removing the previous one.

Errors: a diverged loss raises InvalidRequest naming ``learning_rate``; Redis and store
errors propagate as VajraErrors (the runner fails the job, keeping its last checkpoint).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import trio

from vajra.actors.executor_job_io import JobIO, UsesJobIO
from vajra.actors.executor_thread import ModelThread, Training
from vajra.actors.executor_usage import UsageOutbox
from vajra.errors import InvalidRequest, VajraError
from vajra.policies.billing import training_cost_usd
from vajra.policies.training import TrainParams
from vajra.state.jobs import JobRecord
from vajra.storage import checkpoint_object_key

log = logging.getLogger("vajra.executor.jobs")

__all__ = ["RunningJob", "StepBook"]


@dataclass(eq=False)
class RunningJob:
    """One job this executor runs, and what its steps have left so far."""

    rec: JobRecord
    params: TrainParams
    wake: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    trainer: Any = None
    training: Training | None = None
    stop: str = ""  # why it was stopped from outside: cancelled, lost, purged, handed back
    step: int = 0
    epoch: int = 0
    loss: float = 0.0
    tokens: int = 0
    gradients: int = 0
    cost_usd: float = 0.0
    checkpoint: str = ""  # the newest checkpoint's key
    checkpoint_step: int = 0
    counted_step: int = 0  # a resumed job's progress before the resume: steps counted already
    checkpoint_due: bool = False
    unbilled_gpu_ms: float = 0.0

    def on_report(self) -> None:
        self.wake.set()


class StepBook(UsesJobIO):
    """Bills, progress records and checkpoints of one executor's jobs (module docstring)."""

    def __init__(
        self, io: JobIO, model: ModelThread, usage: UsageOutbox, *, executor_id: str
    ) -> None:
        super().__init__(io)
        self.model = model
        self.usage = usage
        self.executor_id = executor_id

    async def take_reports(self, job: RunningJob) -> None:
        for report in self.model.take_reports(job.training):  # type: ignore[arg-type]
            await self._on_report(job, report)

    async def _on_report(self, job: RunningJob, report: Any) -> None:
        job.unbilled_gpu_ms += float(report.gpu_ms)
        if int(report.step) <= job.step:
            return  # a micro-step inside an optimizer step: billed with the step
        rec, policies = job.rec, self.cfg.policies
        job.step, job.epoch, job.loss = int(report.step), int(report.epoch), float(report.loss)
        if not math.isfinite(job.loss):
            raise InvalidRequest(
                f"training diverged at step {job.step} (the loss is {job.loss}); "
                "lower the learning rate",
                field="learning_rate",
            )
        gradients = int(report.gradients)
        if job.step > job.counted_step:  # else redone after a resume: counted before it
            job.tokens += int(report.tokens)
            job.gradients += gradients
            job.cost_usd += training_cost_usd(
                gradients,
                price_per_million_gradients=policies.price_per_million_gradients,
                gpu_price_per_hour=policies.gpu_price_per_hour,
            )
        self.usage.record_training(
            tenant_id=rec.tenant_id,
            adapter=rec.adapter,
            version=rec.from_version or 0,
            job_id=rec.job_id,
            step=job.step,
            gpu_ms=job.unbilled_gpu_ms,
            gradients=gradients,
            tokens=int(report.tokens),
        )
        job.unbilled_gpu_ms = 0.0
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            await self.redis.run(
                self.state.jobs.progress,
                rec.job_id,
                self.executor_id,
                step=job.step,
                epoch=job.epoch,
                loss=job.loss,
                tokens=job.tokens,
                gradients=job.gradients,
                cost_usd=job.cost_usd,
                total_steps=int(getattr(job.trainer, "total_steps", 0)) or None,
            )
        every = job.params.checkpoint_every
        job.checkpoint_due |= bool(every) and job.step % every == 0

    async def checkpoint(self, job: RunningJob) -> None:
        """Checkpoint the trainer under the step it holds (maybe past the report that asked),
        handle those steps' reports, then record it; the previous one is removed."""
        job.checkpoint_due = False

        def snapshot() -> tuple[bytes, int] | None:  # None: finished meanwhile, none needed
            return None if job.trainer.finished else (job.trainer.checkpoint(), job.trainer.step)

        if (taken := await self.model.exclusive(snapshot)) is None:
            return
        data, step = taken
        await self.take_reports(job)  # the model thread produced them before the snapshot
        job.checkpoint_due = job.checkpoint_due and job.step > step
        key = checkpoint_object_key(job.rec.tenant_id, job.rec.job_id, step)
        await self.store.aput(key, data)
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            await self.redis.run(
                self.state.jobs.checkpointed,
                job.rec.job_id,
                self.executor_id,
                key=key,
                step=step,
            )
        previous, job.checkpoint, job.checkpoint_step = job.checkpoint, key, step
        if previous and previous != key and previous != job.rec.checkpoint_key:
            try:
                await self.store.adelete(previous)
            except VajraError as exc:  # garbage only: the record points at the new one
                log.warning(
                    "job %s: old checkpoint %s not removed: %s", job.rec.job_id, previous, exc
                )
