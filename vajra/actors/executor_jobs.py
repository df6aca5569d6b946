"""The executor's training jobs: claimed from Redis, trained between inference steps, published.

Data flows left to right::

    Redis queue ─claim─▶ JobRunner ◀─dataset, starting weights, checkpoint─ object store
    JobRunner ─attach─▶ model thread (micro-steps between engine steps) ─reports─▶ JobRunner
    JobRunner ─progress / checkpointed / finish─▶ Redis      JobRunner ─record_training─▶ usage
    JobRunner ─PEFT files─▶ object store ─register (staged)─▶ Redis ─AdapterSwap─▶ scheduler
              ─activate─▶ Redis

A runner holds at most ``training.max_jobs_per_executor`` jobs; with a free slot it claims the
oldest queued job for its base model (a lease of ``training.lease_ms``, renewed every third of
it). Each job, in its own task: reads its dataset and parses, checks and tokenizes it in a
worker thread (:mod:`vajra.actors.executor_job_inputs`); reads the starting version
(``from_version``) or starts fresh, or restores its checkpoint (a resumed job); builds the
trainer on the engine's own model (no copy of the base) under the GPU's limiter and attaches
it to the model thread, which interleaves micro-steps with inference
(:mod:`vajra.actors.executor_thread`). After each optimizer step it bills the step
(``UsageOutbox.record_training``), writes progress with the cost so far, and every
``checkpoint_every`` steps stores ``checkpoints/<tenant>/<job>/<step>.safetensors`` and
records it. At the end it publishes the adapter (:mod:`vajra.actors.executor_job_publish`:
PEFT files, a staged version with its lineage, the warm swap, the flip) and finishes the job
``succeeded`` with that version.

Ending early: a renew that answers False (the tenant cancelled, or the lease passed) stops
the job at once; a cancelled job is finished ``cancelled``, an expired one is left as the
expiry marked it. Any error finishes the job ``failed`` naming it, keeping its last
checkpoint (``vajra job resume`` continues from it). Cancellation of the runner (shutdown)
detaches every trainer first; its jobs' leases then pass and they are marked failed
("executor lost") with their checkpoints, exactly as for an executor killed with -9.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import trio

from vajra.actors.executor_job_inputs import check_dataset_key, prepare_examples, starting_weights
from vajra.actors.executor_job_publish import SWAP_TIMEOUT_S, Publisher, SwapFn
from vajra.actors.executor_thread import ModelThread, Training
from vajra.actors.executor_usage import UsageOutbox
from vajra.config import VajraConfig
from vajra.errors import InternalError, InvalidRequest, VajraError
from vajra.policies.billing import training_cost_usd
from vajra.policies.training import InterleaveRule, TrainParams
from vajra.state import ClusterState, OffLoop
from vajra.state.jobs import JobRecord, JobStatus
from vajra.storage import ObjectStore

log = logging.getLogger("vajra.executor.jobs")

#: How often a runner with a free slot looks for a queued job.
CLAIM_POLL_S = 0.5


def checkpoint_key(tenant_id: str, job_id: str, step: int) -> str:
    """Where the checkpoint of ``job_id`` after optimizer step ``step`` is stored."""
    return f"checkpoints/{tenant_id}/{job_id}/{step}.safetensors"


@dataclass(eq=False)
class _Job:
    rec: JobRecord
    params: TrainParams
    wake: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    trainer: Any = None
    training: Training | None = None
    stop: str = ""  # why the job was stopped from outside: "cancelled" or "lost"
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


class JobRunner:
    """One executor's training jobs (see the module docstring)."""

    def __init__(
        self,
        cfg: VajraConfig,
        state: ClusterState,
        store: ObjectStore,
        model: ModelThread,
        usage: UsageOutbox,
        *,
        executor_id: str,
        swap: SwapFn,
        redis: OffLoop | None = None,
    ) -> None:
        self.cfg = cfg
        self.tcfg = cfg.training
        self.state = state
        self.store = store
        self.model = model
        self.engine: Any = model.engine
        self.usage = usage
        self.executor_id = executor_id
        self.redis = redis or OffLoop()
        self.base_model = str(self.engine.model_name)
        self.publisher = Publisher(
            cfg, state, store, self.redis, swap=swap, base_model=self.base_model
        )
        self.jobs: dict[str, _Job] = {}
        self.draining = False

    # --- the claim loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Claim jobs while there is a free slot and run each in a task; runs until
        cancelled (then every job's trainer is detached; see the module docstring)."""
        async with trio.open_nursery() as nursery:
            while True:
                rec = None
                if not self.draining and len(self.jobs) < self.tcfg.max_jobs_per_executor:
                    rec = await self._claim()
                if rec is None:
                    await trio.sleep(CLAIM_POLL_S)
                    continue
                try:
                    params = TrainParams.from_dict(rec.params)
                except VajraError as exc:
                    await self._finish(rec, "failed", error=f"bad training parameters: {exc}")
                    continue
                job = self.jobs[rec.job_id] = _Job(rec, params)
                nursery.start_soon(self._run_job, job)

    async def _claim(self) -> JobRecord | None:
        try:
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                return await self.redis.run(
                    self.state.jobs.claim, self.executor_id, self.base_model, self.tcfg.lease_ms
                )
        except (VajraError, trio.TooSlowError) as exc:
            log.warning("could not look for training jobs: %s", exc)
            return None

    # --- one job --------------------------------------------------------------------------

    async def _run_job(self, job: _Job) -> None:
        rec = job.rec
        log.info("job %s: training %s for tenant %s", rec.job_id, rec.adapter, rec.tenant_id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_lease, job)
                try:
                    version = None
                    with job.scope:
                        version = await self._train_and_publish(job)
                    if version is not None:  # published, even if a cancel came meanwhile
                        await self._finish(rec, "succeeded", result_version=version)
                    elif job.stop == "cancelled":
                        await self._finish(rec, "cancelled", error="cancelled by the tenant")
                    else:
                        log.warning("job %s: lease lost; stopped", rec.job_id)
                except (VajraError, OSError) as exc:
                    await self._fail(job, str(exc))
                except Exception as exc:  # a bug in one job must not end the executor
                    log.exception("job %s failed unexpectedly", rec.job_id)
                    await self._fail(job, f"internal error: {type(exc).__name__}: {exc}")
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._release(job)
            self.jobs.pop(rec.job_id, None)

    async def _release(self, job: _Job) -> None:
        """Detach the job's trainer from the model thread and free it (bounded in time)."""
        with trio.move_on_after(self.cfg.executor.drain_timeout_s + 5):
            if job.training is not None:
                await self.model.detach(job.rec.job_id)
            if job.trainer is not None and hasattr(job.trainer, "close"):
                await self.model.exclusive(job.trainer.close)
            job.trainer = job.training = None

    async def _keep_lease(self, job: _Job) -> None:
        """Renew the lease every third of it; stop the job when it is no longer ours."""
        lease_ms = self.tcfg.lease_ms
        while True:
            await trio.sleep(lease_ms / 3000)
            try:
                with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                    ours = await self.redis.run(
                        self.state.jobs.renew, job.rec.job_id, self.executor_id, lease_ms
                    )
                    if ours:
                        continue
                    now = await self.redis.run(
                        self.state.jobs.get, job.rec.tenant_id, job.rec.job_id
                    )
            except (VajraError, trio.TooSlowError) as exc:
                log.warning("job %s: lease not renewed: %s", job.rec.job_id, exc)
                continue
            job.stop = "cancelled" if now.cancel_requested and now.status == "running" else "lost"
            job.scope.cancel()
            return

    async def _train_and_publish(self, job: _Job) -> int:
        """Prepare, train to the end, publish; the new version's number."""
        from vajra.gpu.training import LoraTrainer

        rec, params = job.rec, job.params
        data = await self.store.aget(check_dataset_key(rec.dataset_key))
        examples = await trio.to_thread.run_sync(
            prepare_examples, self.tcfg, self.engine, rec, params, data
        )
        init: tuple[dict[str, Any], float] | None = None
        if rec.from_version is not None:
            init = await trio.to_thread.run_sync(
                starting_weights, self.state, self.store, rec, self.base_model
            )
        checkpoint = await self.store.aget(rec.checkpoint_key) if rec.checkpoint_key else None
        engine, tokenizer = self.engine, self.engine.tokenizer

        def build() -> Any:
            if checkpoint is not None:
                return LoraTrainer.restore(
                    engine, tokenizer, examples, params, checkpoint=checkpoint
                )
            tensors, alpha = init if init is not None else (None, None)
            return LoraTrainer(engine, tokenizer, examples, params, init=tensors, init_alpha=alpha)

        job.trainer = await self.model.exclusive(build)
        if checkpoint is not None:
            job.checkpoint, job.checkpoint_step = rec.checkpoint_key, rec.checkpoint_step
            job.step = int(job.trainer.step)  # the step the checkpoint holds
            job.counted_step = rec.step  # steps redone up to it were counted (and billed) once
            job.gradients, job.cost_usd, job.tokens = rec.gradients, rec.cost_usd, rec.tokens
            log.info("job %s: resumed from step %d", rec.job_id, rec.checkpoint_step)
        job.training = Training(rec.job_id, job.trainer, job.on_report)
        await self.model.attach(job.training)
        await self._follow(job)
        await self.model.detach(rec.job_id)
        job.training = None
        with trio.CancelScope(shield=True):  # trained: a cancel now would waste it all
            version = await self._publish(job)
        return version

    # --- following the trainer --------------------------------------------------------------

    async def _follow(self, job: _Job) -> None:
        """Handle the trainer's reports until it finished; raises its error."""
        assert job.training is not None
        training = job.training
        while True:
            await job.wake.wait()
            job.wake = trio.Event()
            await self._take_reports(job)
            if job.checkpoint_due:
                await self._checkpoint(job)
            if training.error is not None:
                err = training.error
                raise (
                    err
                    if isinstance(err, VajraError)
                    else InternalError(f"training failed: {type(err).__name__}: {err}")
                )
            if job.trainer.finished and not training.reports:
                return

    async def _take_reports(self, job: _Job) -> None:
        for report in self.model.take_reports(job.training):  # type: ignore[arg-type]
            await self._on_report(job, report)

    async def _on_report(self, job: _Job, report: Any) -> None:
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

    async def _checkpoint(self, job: _Job) -> None:
        """Checkpoint the trainer under the step it holds (maybe past the report that asked),
        handle those steps' reports, then record it; the previous one is removed."""
        job.checkpoint_due = False

        def snapshot() -> tuple[bytes, int] | None:  # None: finished meanwhile, none needed
            return None if job.trainer.finished else (job.trainer.checkpoint(), job.trainer.step)

        if (taken := await self.model.exclusive(snapshot)) is None:
            return
        data, step = taken
        await self._take_reports(job)  # the model thread produced them before the snapshot
        job.checkpoint_due = job.checkpoint_due and job.step > step
        key = checkpoint_key(job.rec.tenant_id, job.rec.job_id, step)
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

    async def _publish(self, job: _Job) -> int:
        """Export the trained adapter (under the GPU's limiter) and publish it."""

        def export() -> tuple[dict[str, Any], dict[str, Any]]:
            return job.trainer.adapter_tensors(), job.trainer.adapter_config()

        tensors, config = await self.model.exclusive(export)
        metrics = {
            "final_loss": job.loss,
            "steps": job.step,
            "epochs": job.epoch,
            "tokens": job.tokens,
            "gradients": job.gradients,
            "job_id": job.rec.job_id,
        }
        return await self.publisher.publish(job.rec, job.params, tensors, config, metrics)

    # --- ending ---------------------------------------------------------------------------

    async def _fail(self, job: _Job, error: str) -> None:
        where = f" (last checkpoint at step {job.checkpoint_step})" if job.checkpoint else ""
        log.warning("job %s failed: %s%s", job.rec.job_id, error, where)
        await self._finish(job.rec, "failed", error=error)

    async def _finish(
        self,
        rec: JobRecord,
        status: JobStatus,
        *,
        result_version: int | None = None,
        error: str = "",
    ) -> None:
        """Record the end of a job (shielded: a shutdown does not leave it half-recorded)."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.cfg.bus.rpc_timeout_s * 2):
            try:
                done = await self.redis.run(
                    functools.partial(
                        self.state.jobs.finish,
                        rec.job_id,
                        self.executor_id,
                        status,
                        result_version=result_version,
                        error=error,
                    )
                )
                log.info("job %s: %s", rec.job_id, done.status)
            except VajraError as exc:
                log.error("job %s: could not record %s: %s", rec.job_id, status, exc)


def interleave_rule(cfg: VajraConfig) -> InterleaveRule:
    """The model thread's rule for inference steps and training micro-steps, as configured
    (``policies.training_preemption_enabled``, ``training.inference_ratio``)."""
    return InterleaveRule(
        preemption_enabled=cfg.policies.training_preemption_enabled,
        inference_ratio=cfg.training.inference_ratio,
    )


__all__ = ["CLAIM_POLL_S", "SWAP_TIMEOUT_S", "JobRunner", "checkpoint_key", "interleave_rule"]
