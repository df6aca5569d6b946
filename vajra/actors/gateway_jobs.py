"""The gateway's job desk: training submissions, job reads, cancel, resume and progress streams.

Data flows left to right::

    client ─TrainSubmit (+dataset frame)─▶ JobDesk ─checks (gateway_train)─▶ object store, Redis
    client ─JobGet / JobList / JobCancel / JobResume─▶ JobDesk ─▶ Redis ─JobReply─▶ client
    client ─JobWatch─▶ JobDesk ─polls Redis─▶ JobProgress … JobProgress, JobReply ─▶ client
    JobDesk ─JobQueued (a job was queued or resumed)─▶ scheduler ─JobOffer─▶ an executor

Each operation runs in a task of its own and is answered through the client protocol: its
reply, or its typed error. Bounds: ``MAX_JOB_OPS`` operations at once (beyond: ``overloaded``
at once), ``MAX_WATCHES`` progress streams per gateway and ``MAX_WATCHES_PER_TENANT`` per
tenant (beyond: ``concurrency_limited``). A stream reads the job every
``training.progress_poll_s`` and sends a :class:`JobProgress` only when the record changed;
it ends with a :class:`JobReply` holding the finished job, or the job as it stands after
``training.max_follow_s``. A ``CancelRequest`` naming the stream's ``request_id`` ends it
(answered ``cancelled``); a client that went away costs one poll per interval until then.

Leases: :meth:`JobDesk.expire_leases` runs for the gateway's lifetime and marks jobs whose
executor stopped renewing ``failed`` ("executor lost", their checkpoint kept) every
``training.expire_interval_s``; several gateways doing it at once is harmless (one Lua script).

Errors: every failure is a typed reply; Redis out of reach answers ``unavailable``.
Cancellation (gateway shutdown) ends the streams without a last message.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import trio

from vajra.actors.gateway_protocol import ClientProtocol
from vajra.actors.gateway_queries import QueryDesk
from vajra.actors.gateway_train import TrainChecks
from vajra.bus.codec import encode
from vajra.bus.messages import (
    CancelRequest,
    JobCancel,
    JobGet,
    JobInfo,
    JobList,
    JobProgress,
    JobQueued,
    JobReply,
    JobResume,
    JobWatch,
    Message,
    TrainSubmit,
)
from vajra.bus.outbox import Outbox
from vajra.config import VajraConfig
from vajra.errors import (
    Cancelled,
    ErrorCode,
    InvalidRequest,
    OverloadedError,
    RateLimited,
    UnavailableError,
    VajraError,
)
from vajra.policies.request_rules import check_id
from vajra.state import ClusterState, OffLoop, TenantRecord
from vajra.state.fields import now_ms
from vajra.state.jobs import JobRecord
from vajra.storage import ObjectStore

log = logging.getLogger("vajra.gateway")

__all__ = ["JobDesk", "JobOp", "job_info"]

JobOp = TrainSubmit | JobGet | JobList | JobCancel | JobResume | JobWatch

#: Job operations in flight at once per gateway (submissions also wait for a parse slot).
MAX_JOB_OPS = 256
#: Progress streams open at once per gateway, and per tenant.
MAX_WATCHES = 1_024
MAX_WATCHES_PER_TENANT = 16
#: The most jobs one JobList returns.
MAX_LIST = 1_000
#: A success this much older than the resolution cache's TTL needs no forget (clock skew).
_RECENT_SLACK_MS = 5_000


def job_info(rec: JobRecord) -> JobInfo:
    """What a tenant sees of a job (no object keys, no executor id)."""
    return JobInfo(
        job_id=rec.job_id,
        adapter=rec.adapter,
        status=rec.status,
        base_model=rec.base_model,
        from_version=rec.from_version,
        params=dict(rec.params),
        dataset_digest=rec.dataset_digest,
        created_ms=rec.created_ms,
        started_ms=rec.started_ms,
        finished_ms=rec.finished_ms,
        step=rec.step,
        total_steps=rec.total_steps,
        epoch=rec.epoch,
        loss=rec.loss,
        tokens=rec.tokens,
        gradients=rec.gradients,
        cost_usd=rec.cost_usd,
        checkpoint_step=rec.checkpoint_step,
        result_version=rec.result_version,
        error=rec.error,
        attempt=rec.attempt,
        cancel_requested=rec.cancel_requested,
    )


class JobDesk:
    """See the module docstring. ``accepting()`` is False once the gateway drains;
    ``spawn(fn, *args)`` starts a task in the gateway's nursery."""

    def __init__(
        self,
        cfg: VajraConfig,
        state: ClusterState,
        store: ObjectStore,
        *,
        clients: ClientProtocol,
        queries: QueryDesk,
        counters: Counter[str],
        accepting: Callable[[], bool],
        spawn: Callable[..., None],
        work_out: Outbox,
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.work_out = work_out  # to the scheduler (JobQueued)
        self.clients = clients
        self.queries = queries
        self.counters = counters
        self._accepting = accepting
        self._spawn = spawn
        self.redis = OffLoop()
        self.checks = TrainChecks(cfg, state, store, self.redis)
        self._ops = 0
        self._watches: dict[tuple[bytes, str], trio.CancelScope] = {}
        self._watching: Counter[str] = Counter()  # open streams per tenant

    # --- dispatch ---------------------------------------------------------------------------

    async def on_message(self, identity: bytes, msg: JobOp, bulk: tuple[bytes, ...]) -> None:
        """Start answering ``msg`` in its own task, or refuse it at once (draining, too many)."""
        self.counters[f"job_{msg.KIND}"] += 1
        if not self._accepting() and isinstance(msg, TrainSubmit | JobResume):
            await self.clients.reply_error(
                identity, msg.request_id, UnavailableError("the gateway is shutting down")
            )
            return
        if self._ops >= MAX_JOB_OPS or (
            isinstance(msg, JobWatch) and len(self._watches) >= MAX_WATCHES
        ):
            self.counters["overloaded"] += 1
            await self.clients.reply_error(
                identity,
                msg.request_id,
                OverloadedError("too many job operations in flight; retry later"),
            )
            return
        self._ops += 1
        self._spawn(self._run, identity, msg, bulk)

    def cancel_watch(self, identity: bytes, msg: CancelRequest) -> bool:
        """End the progress stream ``msg`` names, if this client has one; True if it did."""
        scope = self._watches.get((identity, msg.request_id))
        if scope is None:
            return False
        scope.cancel()
        return True

    async def _run(self, identity: bytes, msg: JobOp, bulk: tuple[bytes, ...]) -> None:
        try:
            if isinstance(msg, JobWatch):
                await self._watch(identity, msg)
            else:
                await self.clients.reply_with(identity, msg.request_id, self._answer(msg, bulk))
        finally:
            self._ops -= 1

    async def _tenant(self, msg: JobOp) -> TenantRecord:
        check_id(msg.request_id, "request_id")
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            tenant = await self.queries.tenant_of(msg.api_key)
        if msg.tenant is not None and msg.tenant not in (tenant.tenant_id, tenant.name):
            raise InvalidRequest(f"unknown tenant {msg.tenant!r}", field="tenant")
        return tenant

    async def _answer(self, msg: JobOp, bulk: tuple[bytes, ...]) -> Message:
        tenant = await self._tenant(msg)
        tid = tenant.tenant_id
        jobs = self.state.jobs
        if isinstance(msg, TrainSubmit):
            rec, digest = await self.checks.submit(tenant, msg, bulk)
            await self._announce(rec, digest)
            return JobReply(msg.request_id, [job_info(rec)])
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            if isinstance(msg, JobList):
                if isinstance(msg.limit, bool) or not 1 <= msg.limit <= MAX_LIST:
                    raise InvalidRequest(f"limit must be in [1, {MAX_LIST}]", field="limit")
                records = await self.redis.run(jobs.list, tid, limit=msg.limit)
                return JobReply(msg.request_id, [job_info(r) for r in records])
            if isinstance(msg, JobGet):
                rec = await self.redis.run(jobs.get, tid, msg.job_id)
            elif isinstance(msg, JobCancel):
                rec = await self.redis.run(jobs.request_cancel, tid, msg.job_id)
                log.info("tenant %s asked to cancel job %s (%s)", tid, rec.job_id, rec.status)
            else:  # JobResume (JobWatch never gets here)
                rec = await self.redis.run(
                    jobs.resume, tid, msg.job_id, max_active=self.cfg.training.max_jobs_per_tenant
                )
                log.info("tenant %s resumed job %s (attempt %d)", tid, rec.job_id, rec.attempt)
        if isinstance(msg, JobResume):
            await self._announce(rec, "")
        self._seen_finished(rec)
        return JobReply(msg.request_id, [job_info(rec)])

    async def _announce(self, rec: JobRecord, digest: str) -> None:
        """Tell the scheduler a job was queued, so placement offers it (a hint: lost, the job
        is claimed after ``training.placement_wait_s`` anyway)."""
        self.work_out.add(encode(JobQueued(rec.job_id, rec.tenant_id, digest)))
        await self.work_out.flush()

    def _seen_finished(self, rec: JobRecord) -> None:
        """A job that just succeeded was published by its executor, which moved the adapter's
        active pointer: forget this gateway's cached resolution of the name, so the tenant that
        saw it succeed gets the new version from its next request on (read your writes; other
        clients see it within ``adapters.resolve_cache_ttl_s``, as after any flip elsewhere).
        Only a recent success: older ones predate every cached resolution."""
        if rec.status != "succeeded":
            return
        recent_ms = 1000 * self.cfg.adapters.resolve_cache_ttl_s + _RECENT_SLACK_MS
        if now_ms() - rec.finished_ms <= recent_ms:
            self.queries.adapters.forget(rec.tenant_id, rec.adapter)

    # --- progress streams -------------------------------------------------------------------

    async def _watch(self, identity: bytes, msg: JobWatch) -> None:
        """Stream the job's changes until it finishes (module docstring); never raises."""
        key = (identity, msg.request_id)
        tid = ""
        try:
            tenant = await self._tenant(msg)
            tid = tenant.tenant_id
            if key in self._watches:
                raise InvalidRequest("a stream with this request_id is open", field="request_id")
            if self._watching[tid] >= MAX_WATCHES_PER_TENANT:
                raise RateLimited(
                    f"at most {MAX_WATCHES_PER_TENANT} job progress streams at once",
                    code=ErrorCode.CONCURRENCY_LIMITED,
                )
        except VajraError as exc:
            await self.clients.reply_error(identity, msg.request_id, exc)
            return
        except trio.TooSlowError:
            await self.clients.reply_error(
                identity, msg.request_id, UnavailableError("cluster state is unreachable; retry")
            )
            return
        self._watching[tid] += 1
        scope = trio.CancelScope()
        self._watches[key] = scope
        try:
            with scope:
                await self._stream(identity, msg, tid)
            if scope.cancelled_caught:
                await self.clients.reply_error(
                    identity, msg.request_id, Cancelled("the progress stream was cancelled")
                )
        finally:
            del self._watches[key]
            self._watching[tid] -= 1
            if self._watching[tid] <= 0:
                del self._watching[tid]

    async def _stream(self, identity: bytes, msg: JobWatch, tenant_id: str) -> None:
        t = self.cfg.training
        last: JobRecord | None = None
        previous: JobRecord | None = None
        index = 0
        with trio.move_on_after(t.max_follow_s):
            while True:
                try:
                    with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                        rec = await self.redis.run(self.state.jobs.get, tenant_id, msg.job_id)
                except VajraError as exc:
                    await self.clients.reply_error(identity, msg.request_id, exc)
                    return
                except trio.TooSlowError:
                    await self.clients.reply_error(
                        identity,
                        msg.request_id,
                        UnavailableError("cluster state is unreachable; retry"),
                    )
                    return
                last = rec
                if rec.terminal:
                    self._seen_finished(rec)
                    break
                if rec != previous:
                    await self.clients.send(
                        identity, JobProgress(msg.request_id, index, job_info(rec))
                    )
                    index += 1
                previous = rec
                await trio.sleep(t.progress_poll_s)
        if last is not None:
            await self.clients.send(identity, JobReply(msg.request_id, [job_info(last)]))

    # --- leases -----------------------------------------------------------------------------

    async def expire_leases(self) -> None:
        """Mark running jobs whose lease passed as failed, every ``expire_interval_s``, until
        cancelled; a Redis failure is logged and retried at the next interval."""
        interval = max(0.05, self.cfg.training.expire_interval_s)
        while True:
            await trio.sleep(interval)
            try:
                with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                    lost = await self.redis.run(self.state.jobs.expire, now_ms())
            except (VajraError, trio.TooSlowError) as exc:
                log.warning("could not expire training job leases: %s", exc)
                continue
            for job_id in lost:
                log.warning("training job %s lost its executor; marked failed", job_id)
