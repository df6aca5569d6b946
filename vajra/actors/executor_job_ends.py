"""How an executor records the end of a training job, or forgets a job whose tenant is gone.

:class:`JobEnds` is the job runner's (:mod:`vajra.actors.executor_jobs`) one way to write a
job's final status (``succeeded``, ``failed``, ``cancelled``) to Redis, and to clean up after a
job whose record was purged with its tenant: nothing can be recorded then, and the job's
checkpoints are removed from the object store (one may have been written after the gateway's
pass over the tenant's files). Every call is shielded and bounded in time, so a shutdown does
not leave an end half-recorded; errors are logged, never raised.
"""

from __future__ import annotations

import functools
import logging

import trio

from vajra.actors.executor_job_io import JobIO, UsesJobIO
from vajra.errors import NotFoundError, VajraError
from vajra.state.jobs import JobRecord, JobStatus
from vajra.storage import adelete_prefix, job_checkpoints_prefix

log = logging.getLogger("vajra.executor.jobs")

__all__ = ["JobEnds"]


class JobEnds(UsesJobIO):
    """Final records of one executor's jobs (see the module docstring)."""

    def __init__(self, io: JobIO, *, executor_id: str) -> None:
        super().__init__(io)
        self.executor_id = executor_id

    async def finish(
        self,
        rec: JobRecord,
        status: JobStatus,
        *,
        result_version: int | None = None,
        error: str = "",
    ) -> None:
        """Record the end of a job; a failure to record it is logged."""
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

    async def purged(self, rec: JobRecord) -> bool:
        """Whether the job's record is gone (its tenant was deleted); False when unsure."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.cfg.bus.rpc_timeout_s):
            try:
                await self.redis.run(self.state.jobs.get, rec.tenant_id, rec.job_id)
            except NotFoundError:
                return True
            except VajraError:
                return False
        return False

    async def forget(self, rec: JobRecord) -> None:
        """A purged job: remove every checkpoint it stored; nothing is recorded."""
        prefix = job_checkpoints_prefix(rec.tenant_id, rec.job_id)
        with trio.CancelScope(shield=True), trio.move_on_after(self.cfg.storage.s3_op_timeout_s):
            try:
                removed = await adelete_prefix(self.store, prefix)
            except VajraError as exc:
                log.error(
                    "job %s: checkpoints of a deleted tenant not removed: %s", rec.job_id, exc
                )
                return
            log.info("job %s: tenant deleted; stopped, %d checkpoints removed", rec.job_id, removed)
