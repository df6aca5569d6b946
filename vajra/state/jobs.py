# Over 400 lines: the one owner of the job keys; every transition is a Lua script (in
# job_records) with its checked wrapper here, read together.
"""Training jobs in Redis: records, the queue per base model, leases, cancel flags, the index.

A job moves ``queued -> running -> succeeded | failed | cancelled``; a failed or cancelled job
that has a checkpoint may be resumed (back to ``queued``, ``attempt + 1``). Every transition is
one Lua script, so two executors claiming one job, or a cancel racing a claim, leave exactly one
winner and no reader ever sees half of a transition.

Keys (:mod:`vajra.state.keys`): the record ``vajra:job:{job_id}`` (hash, tenant in a field);
per tenant an index ``vajra:jobs:{t}:index`` (zset by ``created_ms``, bounded: the oldest
*finished* jobs beyond ``index_limit`` are forgotten) and ``vajra:jobs:{t}:active`` (set of its
queued and running jobs, for the per-tenant limit); a FIFO ``vajra:jobs:queue:{base_model}``
(list of job ids); ``vajra:jobs:running`` (zset job id -> lease deadline ms) and
``vajra:jobs:executor:{executor_id}`` (set of the jobs it runs).

Claims: the scheduler places a queued job (Algorithm 2) and offers it to one executor, which
claims that job by id; any executor may claim a job that has waited ``placement_wait_ms``
unclaimed (no scheduler, a lost offer), oldest first. ``queued_ms`` says when a job was last
queued. Leases: :meth:`Jobs.claim` gives the claiming executor a lease of ``lease_ms``; it keeps the
job by calling :meth:`Jobs.renew` before it passes. :meth:`Jobs.expire` marks every running
job whose lease passed ``failed`` with error ``"executor lost"``, keeping its checkpoint, so
:meth:`Jobs.resume` can continue it. Cancelling a running job sets a flag; the executor's next
:meth:`Jobs.renew` answers False and it stops and calls :meth:`Jobs.finish` with
``"cancelled"``. An executor that drains hands its running jobs back (:meth:`Jobs.requeue`):
they are claimed next, from their last checkpoint.

Ownership: a job of another tenant answers exactly like one that does not exist
(:class:`~vajra.errors.NotFoundError`, same message). Executor-side calls (``renew``,
``progress``, ``checkpointed``, ``finish``) change nothing unless the job is running on that
executor; ``finish`` then returns the record as it stands.

Errors: as :mod:`vajra.state.connection` (UnavailableError / InternalError naming "the job
store"); InvalidRequest naming the field for bad arguments, before anything is written;
QuotaExceeded when a tenant is at its limit of active jobs.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import replace
from typing import Any

from vajra.errors import InvalidRequest, NotFoundError, QuotaExceeded
from vajra.state import job_records as jr
from vajra.state import keys
from vajra.state.connection import Connection, KeyOwner, translate_errors
from vajra.state.fields import check_id, check_non_negative_int, now_ms
from vajra.state.job_records import (
    ACTIVE_STATUSES,
    EXECUTOR_LOST,
    TERMINAL_STATUSES,
    JobRecord,
    JobStatus,
    decode_record,
    encode_record,
    flat_row,
    new_job_id,
)

__all__ = [
    "ACTIVE_STATUSES",
    "EXECUTOR_LOST",
    "TERMINAL_STATUSES",
    "JobRecord",
    "JobStatus",
    "Jobs",
    "new_job_id",
    "purge_tenant_jobs",
]

DEFAULT_INDEX_LIMIT = 1_000
_EXPIRE_BATCH = 256
_CLAIM_SCAN = 64  # queue entries a claim looks at, from the oldest


class Jobs(KeyOwner):
    """The training-job records; the only writer of the ``vajra:job*`` keys.

    ``index_limit`` bounds each tenant's index (finished jobs beyond it are forgotten,
    oldest first). Synchronous and thread-safe; Trio code calls it through an OffLoop.
    """

    what = "the job store"

    def __init__(self, conn: Connection, *, index_limit: int = DEFAULT_INDEX_LIMIT) -> None:
        super().__init__(conn)
        self._index_limit = index_limit
        self._create = conn.script(jr.CREATE_LUA)
        self._claim = conn.script(jr.CLAIM_LUA)
        self._renew = conn.script(jr.RENEW_LUA)
        self._update = conn.script(jr.UPDATE_LUA)
        self._finish = conn.script(jr.FINISH_LUA)
        self._cancel = conn.script(jr.CANCEL_LUA)
        self._resume = conn.script(jr.RESUME_LUA)
        self._expire = conn.script(jr.EXPIRE_LUA)
        self._requeue = conn.script(jr.REQUEUE_LUA)

    # --- tenant side ----------------------------------------------------------------------

    @translate_errors
    def create(
        self, rec: JobRecord, *, max_active: int = 0, index_limit: int | None = None
    ) -> JobRecord:
        """Store ``rec`` as ``queued`` (``created_ms`` now if 0) and push it on its queue.

        Raises QuotaExceeded (nothing written) when the tenant already has ``max_active``
        queued or running jobs (0: no limit); InvalidRequest for a bad id or an id in use.
        ``index_limit`` (default: the owner's) bounds the tenant's index: its oldest finished
        jobs beyond it are forgotten.
        """
        check_id(rec.job_id, "job_id")
        check_id(rec.tenant_id, "tenant_id")
        check_id(rec.adapter, "adapter")
        if not rec.base_model or len(rec.base_model) > 512:
            raise InvalidRequest("base_model must be 1-512 characters", field="base_model")
        check_non_negative_int(max_active, "max_active")
        rec = replace(
            rec,
            status="queued",
            created_ms=(created := rec.created_ms or now_ms()),
            queued_ms=created,
            started_ms=0,
            finished_ms=0,
            executor_id="",
            cancel_requested=False,
            result_version=None,
            error="",
        )
        code = self._create(
            keys=[
                keys.job(rec.job_id),
                keys.jobs_index(rec.tenant_id),
                keys.jobs_active(rec.tenant_id),
                keys.jobs_queue(rec.base_model),
            ],
            args=[
                rec.job_id,
                rec.created_ms,
                max_active,
                self._index_limit if index_limit is None else index_limit,
                keys.job(""),
                *encode_record(rec),
            ],
        )
        if int(code) == -1:
            raise QuotaExceeded(
                f"the tenant already has {max_active} training jobs queued or running; "
                "wait for one to finish or cancel one",
                field="max_jobs_per_tenant",
            )
        if int(code) == -2:
            raise InvalidRequest("job_id is already in use", field="job_id")
        return rec

    @translate_errors
    def get(self, tenant_id: str, job_id: str) -> JobRecord:
        """The job; NotFoundError (same message) if it is missing or another tenant's."""
        if not _is_id(tenant_id) or not _is_id(job_id):
            raise _not_found(job_id)
        row = self._r.hgetall(keys.job(job_id))
        if not row or row.get("tenant_id") != tenant_id:
            raise _not_found(job_id)
        return decode_record(row)

    @translate_errors
    def list(self, tenant_id: str, *, limit: int = 100) -> list[JobRecord]:
        """The tenant's newest ``limit`` jobs (at most), newest first."""
        check_id(tenant_id, "tenant_id")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidRequest("limit must be an integer in [1, 10000]", field="limit")
        ids = self._r.zrevrange(keys.jobs_index(tenant_id), 0, limit - 1)
        if not ids:
            return []
        pipe = self._r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(keys.job(job_id))
        out = []
        for row in pipe.execute():
            if row and row.get("tenant_id") == tenant_id:
                out.append(decode_record(row))
        return out

    @translate_errors
    def request_cancel(self, tenant_id: str, job_id: str) -> JobRecord:
        """Cancel: a queued job becomes ``cancelled`` at once; a running one gets the cancel
        flag (its executor stops at its next renew). A finished job is returned unchanged."""
        if not _is_id(tenant_id) or not _is_id(job_id):
            raise _not_found(job_id)
        job_key = keys.job(job_id)
        base = self._r.hget(job_key, "base_model") or ""
        flat = self._cancel(
            keys=[job_key, keys.jobs_active(tenant_id), keys.jobs_queue(base)],
            args=[job_id, tenant_id, now_ms()],
        )
        if not flat:
            raise _not_found(job_id)
        return decode_record(flat_row(flat))

    @translate_errors
    def resume(self, tenant_id: str, job_id: str, *, max_active: int = 0) -> JobRecord:
        """Queue a failed or cancelled job again from its last checkpoint (``attempt + 1``).

        InvalidRequest (field ``status``) if the job is not failed/cancelled or has no
        checkpoint; QuotaExceeded at ``max_active``; NotFoundError as :meth:`get`.
        """
        if not _is_id(tenant_id) or not _is_id(job_id):
            raise _not_found(job_id)
        job_key = keys.job(job_id)
        base = self._r.hget(job_key, "base_model") or ""
        flat = self._resume(
            keys=[job_key, keys.jobs_active(tenant_id), keys.jobs_queue(base)],
            args=[job_id, tenant_id, max_active, now_ms()],
        )
        code = int(flat[0])
        if code == 0:
            raise _not_found(job_id)
        rec = decode_record(flat_row(flat[1:]))
        if code == -1:
            raise QuotaExceeded(
                f"the tenant already has {max_active} training jobs queued or running",
                field="max_jobs_per_tenant",
            )
        if code == -2:
            raise InvalidRequest(
                f"job {job_id} is {rec.status}; only a failed or cancelled job can be resumed",
                field="status",
            )
        if code == -3:
            raise InvalidRequest(
                f"job {job_id} has no checkpoint to resume from; submit it again",
                field="checkpoint",
            )
        return rec

    # --- executor side --------------------------------------------------------------------

    @translate_errors
    def claim(
        self,
        executor_id: str,
        base_model: str,
        lease_ms: int,
        *,
        job_id: str = "",
        placement_wait_ms: int = 0,
    ) -> JobRecord | None:
        """Atomically take a queued job of ``base_model``: it becomes ``running`` on
        ``executor_id`` with a lease of ``lease_ms``. None if there is none to take.

        ``job_id``: that job (placement offered it here), if it is still queued. Otherwise
        the oldest queued job that has waited at least ``placement_wait_ms`` for placement
        (0: the oldest, at once); at most the queue's last 64 entries are looked at.
        """
        check_id(executor_id, "executor_id")
        _check_lease(lease_ms)
        check_non_negative_int(placement_wait_ms, "placement_wait_ms")
        if job_id and not _is_id(job_id):
            return None
        now = now_ms()
        flat = self._claim(
            keys=[keys.jobs_queue(base_model), keys.jobs_running()],
            args=[
                keys.job(""),
                executor_id,
                now,
                now + lease_ms,
                keys.jobs_executor(""),
                _CLAIM_SCAN,
                now - placement_wait_ms,
                job_id,
            ],
        )
        return decode_record(flat_row(flat)) if flat else None

    @translate_errors
    def renew(self, job_id: str, executor_id: str, lease_ms: int) -> bool:
        """Extend the lease; False if the job is no longer running here (cancel requested,
        expired, finished): the executor should stop it (and finish it as cancelled if
        :meth:`get`/the record shows ``cancel_requested``)."""
        _check_lease(lease_ms)
        if not _is_id(job_id) or not _is_id(executor_id):
            return False
        ok = self._renew(
            keys=[keys.job(job_id), keys.jobs_running()],
            args=[job_id, executor_id, now_ms() + lease_ms],
        )
        return bool(int(ok))

    @translate_errors
    def progress(
        self,
        job_id: str,
        executor_id: str,
        *,
        step: int,
        epoch: int,
        loss: float,
        tokens: int,
        gradients: int,
        cost_usd: float,
        total_steps: int | None = None,
    ) -> None:
        """Record progress; a no-op unless the job is running on ``executor_id``."""
        values: list[Any] = []
        for name, value in (("step", step), ("epoch", epoch), ("tokens", tokens)):
            values += [name, check_non_negative_int(value, name)]
        values += ["gradients", check_non_negative_int(gradients, "gradients")]
        if total_steps is not None:
            values += ["total_steps", check_non_negative_int(total_steps, "total_steps")]
        for name, fvalue in (("loss", loss), ("cost_usd", cost_usd)):
            if not isinstance(fvalue, (int, float)) or not math.isfinite(fvalue):
                raise InvalidRequest(f"{name} must be a finite number", field=name)
            values += [name, repr(float(fvalue))]
        self._update(keys=[keys.job(job_id)], args=[executor_id, *values])

    @translate_errors
    def checkpointed(self, job_id: str, executor_id: str, *, key: str, step: int) -> None:
        """Record the object key of the newest checkpoint; a no-op unless running here."""
        if not isinstance(key, str) or not key or len(key) > 1024:
            raise InvalidRequest("key must be 1-1024 characters", field="key")
        check_non_negative_int(step, "step")
        self._update(
            keys=[keys.job(job_id)],
            args=[executor_id, "checkpoint_key", key, "checkpoint_step", step],
        )

    @translate_errors
    def finish(
        self,
        job_id: str,
        executor_id: str,
        status: JobStatus,
        *,
        result_version: int | None = None,
        error: str = "",
    ) -> JobRecord:
        """End a job running on ``executor_id`` with a terminal ``status``; returns the record.

        If the job is not running there (expired, or cancelled while queued) nothing changes
        and the record is returned as it stands; NotFoundError if the job is gone.
        """
        if status not in TERMINAL_STATUSES:
            raise InvalidRequest("status must be succeeded, failed or cancelled", field="status")
        check_id(job_id, "job_id")
        check_id(executor_id, "executor_id")
        job_key = keys.job(job_id)
        tenant = self._r.hget(job_key, "tenant_id")
        if tenant is None:
            raise _not_found(job_id)
        flat = self._finish(
            keys=[
                job_key,
                keys.jobs_running(),
                keys.jobs_active(tenant),
                keys.jobs_executor(executor_id),
            ],
            args=[
                job_id,
                executor_id,
                status,
                now_ms(),
                "" if result_version is None else int(result_version),
                str(error)[:2000],
            ],
        )
        if not flat:
            raise _not_found(job_id)
        return decode_record(flat_row(flat))

    @translate_errors
    def requeue(self, job_id: str, executor_id: str) -> bool:
        """Hand a job running on ``executor_id`` back to the queue (its executor drains): it is
        the next one claimed, ``attempt + 1``, from its last checkpoint. False, changing
        nothing, if it is not running there or a cancel was requested (finish it instead)."""
        check_id(job_id, "job_id")
        check_id(executor_id, "executor_id")
        job_key = keys.job(job_id)
        base = self._r.hget(job_key, "base_model") or ""
        at = [job_key, keys.jobs_running(), keys.jobs_executor(executor_id), keys.jobs_queue(base)]
        return bool(self._requeue(keys=at, args=[job_id, executor_id, now_ms()]))

    @translate_errors
    def expire(self, now_ms: int) -> builtins.list[str]:
        """Mark running jobs whose lease passed before ``now_ms`` failed (``executor lost``),
        keeping their checkpoint; return their ids (at most a few hundred a call)."""
        check_non_negative_int(now_ms, "now_ms")
        out = self._expire(
            keys=[keys.jobs_running()],
            args=[
                keys.job(""),
                now_ms,
                _EXPIRE_BATCH,
                keys.jobs_executor(""),
                *keys.jobs_active("\0").split("\0"),
                EXECUTOR_LOST,
            ],
        )
        return [str(x) for x in out]

    @translate_errors
    def active_count(self, tenant_id: str) -> int:
        """How many of the tenant's jobs are queued or running."""
        check_id(tenant_id, "tenant_id")
        return int(self._r.scard(keys.jobs_active(tenant_id)))

    @translate_errors
    def running_on(self, executor_id: str) -> builtins.list[str]:
        """The ids of the jobs running on ``executor_id``, sorted."""
        check_id(executor_id, "executor_id")
        return sorted(self._r.smembers(keys.jobs_executor(executor_id)))

    @translate_errors
    def queued_count(self, base_model: str) -> int:
        """How many entries the queue of ``base_model`` holds (cancelled ones included until a
        claim skips them)."""
        return int(self._r.llen(keys.jobs_queue(base_model)))


def _is_id(value: object) -> bool:
    try:
        check_id(value, "id")
    except InvalidRequest:
        return False
    return True


def _check_lease(lease_ms: object) -> None:
    if isinstance(lease_ms, bool) or not isinstance(lease_ms, int) or lease_ms <= 0:
        raise InvalidRequest("lease_ms must be a positive integer", field="lease_ms")


def _not_found(job_id: object) -> NotFoundError:
    shown = job_id if isinstance(job_id, str) and _is_id(job_id) else "?"
    return NotFoundError(f"no training job {shown}", field="job_id")


def purge_tenant_jobs(conn: Connection, tenant_id: str) -> int:
    """Delete every training job of ``tenant_id`` (records, index, active set, queue and
    lease entries); return how many keys were deleted. A running job's executor sees its
    next renew fail and stops. Redis errors propagate as redis-py exceptions."""
    check_id(tenant_id, "tenant_id")
    script = conn.script(jr.PURGE_TENANT_LUA)
    out = script(
        keys=[keys.jobs_index(tenant_id), keys.jobs_active(tenant_id), keys.jobs_running()],
        args=[keys.job(""), keys.jobs_queue(""), keys.jobs_executor(""), tenant_id],
    )
    return int(out)
