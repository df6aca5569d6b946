"""The executor's training jobs: claimed from Redis, trained between inference steps, published.

Data flows left to right::

    Redis queue ─claim─▶ JobRunner ◀─dataset, starting weights, checkpoint─ object store
    JobRunner ─attach─▶ model thread (micro-steps between engine steps) ─reports─▶ JobRunner
    JobRunner ─progress / checkpointed / finish─▶ Redis      JobRunner ─record_training─▶ usage
    JobRunner ─PEFT files─▶ object store ─register (staged)─▶ Redis ─AdapterSwap─▶ scheduler
              ─activate─▶ Redis

A runner holds at most ``training.max_jobs_per_executor`` jobs; with a free slot it claims a
job the scheduler's placement offered it (``JobOffer``, :mod:`vajra.actors.scheduler_jobs`),
else the oldest queued job for its base model that no offer took within
``training.placement_wait_s`` (a lease of ``training.lease_ms``, renewed every third of it). Each job, in its own task: reads its dataset and parses, checks and tokenizes it in a
worker thread (:mod:`vajra.actors.executor_job_inputs`); reads the starting version
(``from_version``) or starts fresh, or restores its checkpoint (a resumed job); builds the
trainer on the engine's own model (no copy of the base) under the GPU's limiter and attaches
it to the model thread, which interleaves micro-steps with inference
(:mod:`vajra.actors.executor_thread`). After each optimizer step the job's
:class:`~vajra.actors.executor_job_steps.StepBook` bills the step, writes progress with the
cost so far, and every ``checkpoint_every`` steps stores a checkpoint. At the end it publishes
the adapter (:mod:`vajra.actors.executor_job_publish`: PEFT files, a staged version with its
lineage, the warm swap, the flip) and finishes the job ``succeeded`` with that version.

Ending early: a renew that answers False (the tenant cancelled, or the lease passed) stops
the job at once; a cancelled job is finished ``cancelled``, an expired one is left as the
expiry marked it, and one whose record is gone (its tenant was deleted) records nothing and
removes its own checkpoints (:mod:`vajra.actors.executor_job_ends`). Any error finishes the
job ``failed`` naming it, keeping its last checkpoint (``vajra job resume`` continues from
it). A drain (:meth:`JobRunner.hand_back`) checkpoints every job where it stands and queues it
again, to be continued from there. Cancellation of the runner (a shutdown without a drain)
detaches every trainer first; its jobs' leases then pass and they are marked failed
("executor lost") with their checkpoints, exactly as for an executor killed with -9.
"""

from __future__ import annotations

import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from vajra.actors.base import wait_until
from vajra.actors.executor_job_ends import JobEnds
from vajra.actors.executor_job_inputs import check_dataset_key, prepare_examples, starting_weights
from vajra.actors.executor_job_io import JobIO
from vajra.actors.executor_job_publish import SWAP_TIMEOUT_S, Publisher, SwapFn
from vajra.actors.executor_job_steps import RunningJob, StepBook
from vajra.actors.executor_thread import ModelThread, Training
from vajra.actors.executor_usage import UsageOutbox
from vajra.bus.codec import encode
from vajra.bus.messages import JobQueued
from vajra.config import VajraConfig
from vajra.errors import InternalError, NotFoundError, VajraError
from vajra.policies.training import InterleaveRule, TrainParams
from vajra.state import ClusterState, OffLoop
from vajra.state.jobs import JobRecord
from vajra.storage import ObjectStore

log = logging.getLogger("vajra.executor.jobs")

#: How often a runner with a free slot looks for a queued job.
CLAIM_POLL_S = 0.5


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
        to_scheduler: Callable[[list[bytes]], Awaitable[None]] | None = None,
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
        io = JobIO(cfg, state, store, self.redis)
        self.publisher = Publisher(io, swap=swap, base_model=self.base_model)
        self.ends = JobEnds(io, executor_id=executor_id)
        self.book = StepBook(io, model, usage, executor_id=executor_id)
        self.jobs: dict[str, RunningJob] = {}
        self.draining = False
        self._offers: deque[str] = deque(maxlen=64)  # job ids placement offered here
        self._offered = trio.Event()
        self._to_scheduler = to_scheduler

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
                    with trio.move_on_after(CLAIM_POLL_S):
                        await self._offered.wait()  # an offer wakes the loop at once
                    self._offered = trio.Event()
                    continue
                try:
                    params = TrainParams.from_dict(rec.params)
                except VajraError as exc:
                    await self.ends.finish(rec, "failed", error=f"bad training parameters: {exc}")
                    continue
                job = self.jobs[rec.job_id] = RunningJob(rec, params)
                nursery.start_soon(self._run_job, job)

    def offer(self, job_id: str) -> None:
        """The scheduler's placement offers this queued job here (claimed by the run loop)."""
        if len(self._offers) < self._offers.maxlen:  # type: ignore[operator]
            self._offers.append(job_id)
            self._offered.set()

    def report(self) -> dict[str, Any]:
        """The LoadReport fields of training: jobs running here and slots (0 when draining)."""
        slots = 0 if self.draining else self.tcfg.max_jobs_per_executor
        return {"training_jobs": list(self.jobs), "training_slots": slots}

    async def _claim(self) -> JobRecord | None:
        """An offered job if one is still queued, else the oldest job placement left."""
        wait_ms = max(0, round(self.tcfg.placement_wait_s * 1000))
        try:
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                while self._offers:
                    rec = await self.redis.run(
                        functools.partial(
                            self.state.jobs.claim,
                            self.executor_id,
                            self.base_model,
                            self.tcfg.lease_ms,
                            job_id=self._offers.popleft(),
                        )
                    )
                    if rec is not None:
                        return rec
                return await self.redis.run(
                    functools.partial(
                        self.state.jobs.claim,
                        self.executor_id,
                        self.base_model,
                        self.tcfg.lease_ms,
                        placement_wait_ms=wait_ms,
                    )
                )
        except (VajraError, trio.TooSlowError) as exc:
            log.warning("could not look for training jobs: %s", exc)
            return None

    # --- one job --------------------------------------------------------------------------

    async def _run_job(self, job: RunningJob) -> None:
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
                        await self.ends.finish(rec, "succeeded", result_version=version)
                    elif job.stop == "cancelled":
                        await self.ends.finish(rec, "cancelled", error="cancelled by the tenant")
                    elif job.stop == "purged":
                        await self.ends.forget(job.rec)
                    elif job.stop == "handed back":
                        await self._requeue(job)
                    else:
                        log.warning("job %s: lease lost; stopped", rec.job_id)
                except (VajraError, OSError) as exc:
                    if job.stop == "purged" or await self.ends.purged(job.rec):
                        await self.ends.forget(job.rec)
                    else:
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

    async def hand_back(self) -> None:
        """Drain: claim nothing more; stop every job at its current step, checkpoint it and
        queue it again, so that another executor (or this one, restarted) continues it.
        Bounded by ``executor.drain_timeout_s`` (plus the checkpoint writes); a job still
        running then is left to its lease, as when an executor dies."""
        self.draining = True
        for job in list(self.jobs.values()):
            if not job.stop:
                job.stop = "handed back"
                job.scope.cancel()
        with trio.move_on_after(self.cfg.executor.drain_timeout_s + self.cfg.bus.rpc_timeout_s):
            await wait_until(lambda: not self.jobs, poll_s=0.05)

    async def _requeue(self, job: RunningJob) -> None:
        """A handed-back job: its steps so far checkpointed and billed, then queued again
        (:meth:`vajra.state.jobs.Jobs.requeue`); a cancel requested meanwhile finishes it."""
        with trio.CancelScope(shield=True):
            if job.training is not None:
                await self.model.detach(job.rec.job_id)  # no micro-step after the snapshot
                await self.book.take_reports(job)
                if job.trainer is not None and job.step > job.checkpoint_step:
                    await self.book.checkpoint(job)
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                requeued = await self.redis.run(
                    self.state.jobs.requeue, job.rec.job_id, self.executor_id
                )
            if requeued:
                log.info("job %s: handed back at step %d", job.rec.job_id, job.checkpoint_step)
                if self._to_scheduler is not None:  # placement offers it to another executor
                    with trio.move_on_after(self.cfg.bus.rpc_timeout_s):
                        await self._to_scheduler(
                            encode(JobQueued(job.rec.job_id, job.rec.tenant_id))
                        )
            else:  # cancelled meanwhile (or expired: then finish changes nothing)
                await self.ends.finish(job.rec, "cancelled", error="cancelled by the tenant")

    async def _release(self, job: RunningJob) -> None:
        """Detach the job's trainer from the model thread and free it (bounded in time)."""
        with trio.move_on_after(self.cfg.executor.drain_timeout_s + 5):
            if job.training is not None:
                await self.model.detach(job.rec.job_id)
            if job.trainer is not None and hasattr(job.trainer, "close"):
                await self.model.exclusive(job.trainer.close)
            job.trainer = job.training = None

    async def _keep_lease(self, job: RunningJob) -> None:
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
            except NotFoundError:  # the tenant was deleted, its jobs with it
                job.stop = "purged"
                job.scope.cancel()
                return
            except (VajraError, trio.TooSlowError) as exc:
                log.warning("job %s: lease not renewed: %s", job.rec.job_id, exc)
                continue
            job.stop = "cancelled" if now.cancel_requested and now.status == "running" else "lost"
            job.scope.cancel()
            return

    async def _train_and_publish(self, job: RunningJob) -> int:
        """Prepare, train to the end, publish; the new version's number."""
        from vajra.gpu.training import LoraTrainer

        rec, params = job.rec, job.params
        key = check_dataset_key(rec.dataset_key)
        data = await self.store.aget(key, max_bytes=self.tcfg.max_dataset_bytes)
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

    async def _follow(self, job: RunningJob) -> None:
        """Handle the trainer's reports until it finished; raises its error."""
        assert job.training is not None
        training = job.training
        while True:
            await job.wake.wait()
            job.wake = trio.Event()
            await self.book.take_reports(job)
            if job.checkpoint_due:
                await self.book.checkpoint(job)
            if training.error is not None:
                err = training.error
                raise (
                    err
                    if isinstance(err, VajraError)
                    else InternalError(f"training failed: {type(err).__name__}: {err}")
                )
            # The trainer counts a step as done before its report is handed over, so
            # "finished" alone could drop the last step's report (and its bill): done only once
            # every step the trainer made has been reported here.
            if job.trainer.finished and job.step >= int(job.trainer.step):
                return

    async def _publish(self, job: RunningJob) -> int:
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

    async def _fail(self, job: RunningJob, error: str) -> None:
        where = f" (last checkpoint at step {job.checkpoint_step})" if job.checkpoint else ""
        log.warning("job %s failed: %s%s", job.rec.job_id, error, where)
        await self.ends.finish(job.rec, "failed", error=error)


def interleave_rule(cfg: VajraConfig) -> InterleaveRule:
    """The model thread's rule for inference steps and training micro-steps, as configured
    (``policies.training_preemption_enabled``, ``training.inference_ratio``)."""
    return InterleaveRule(
        preemption_enabled=cfg.policies.training_preemption_enabled,
        inference_ratio=cfg.training.inference_ratio,
    )


__all__ = ["CLAIM_POLL_S", "SWAP_TIMEOUT_S", "JobRunner", "interleave_rule"]
