"""Training jobs in the SDK: the submission, the job handle, progress streams (blocking side).

::

    job = client.train("support-bot", "train.jsonl", epochs=3, learning_rate=1e-3)
    for info in job.follow():
        print(info.status, info.step, "/", info.total_steps, info.loss)
    final = job.wait(timeout_s=3600)       # JobInfo; final.result_version is the new version

``dataset`` is a local path (read and uploaded, at most ``max_dataset_bytes``, checked
before anything is sent), the bytes of a JSON Lines file, or ``"s3://bucket/key"`` in the
cluster's bucket under ``datasets/<tenant_id>/``. Training parameters are checked here
(:class:`~vajra.policies.training.TrainParams`) before sending; only those given are sent, so
the cluster's defaults apply to the rest. The Trio side is :mod:`vajra.client._jobs_async`.

Errors: as every SDK call (typed :class:`~vajra.errors.VajraError`); a follow whose deadline
passes raises :class:`~vajra.errors.TimeoutError`, and stopping a follow early (closing the
generator) ends the stream at the gateway.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from vajra.bus.codec import encode
from vajra.bus.messages import (
    CancelRequest,
    ErrorReply,
    JobCancel,
    JobGet,
    JobList,
    JobProgress,
    JobReply,
    JobResume,
    JobWatch,
    Message,
    TrainSubmit,
)
from vajra.bus.messages import JobInfo as WireJob
from vajra.client._replies import interpret_reply
from vajra.client._requests import new_request_id
from vajra.errors import InvalidRequest, PayloadTooLarge, ProtocolError, TimeoutError, VajraError
from vajra.policies.training import TrainParams

if TYPE_CHECKING:
    from vajra.client._sync import Client

__all__ = ["DEFAULT_MAX_DATASET_BYTES", "JobInfo", "JobsMixin", "TrainingJob"]

#: The SDK's upload bound when the caller names none (the cluster's default limit).
DEFAULT_MAX_DATASET_BYTES = 16_777_216
#: How long a follow may last when the caller names no timeout.
DEFAULT_FOLLOW_S = 86_400.0
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

JobRequest = TrainSubmit | JobGet | JobList | JobCancel | JobResume | JobWatch


@dataclass(frozen=True, slots=True)
class JobInfo:
    """One training job as the cluster reports it (times in ms since the epoch)."""

    job_id: str
    adapter: str
    status: str  # queued, running, succeeded, failed, cancelled
    base_model: str = ""
    from_version: int | None = None  # None: a fresh adapter
    params: dict[str, Any] = field(default_factory=dict)
    dataset_digest: str = ""
    created_ms: int = 0
    started_ms: int = 0
    finished_ms: int = 0
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float = 0.0
    tokens: int = 0
    gradients: int = 0
    cost_usd: float = 0.0
    checkpoint_step: int = 0
    result_version: int | None = None  # the trained version, once succeeded
    error: str = ""
    attempt: int = 1
    cancel_requested: bool = False

    @property
    def terminal(self) -> bool:
        """True once the job succeeded, failed or was cancelled."""
        return self.status in TERMINAL

    @classmethod
    def from_wire(cls, w: WireJob) -> JobInfo:
        return cls(
            **{name: getattr(w, name) for name in cls.__dataclass_fields__}  # type: ignore[arg-type]
        )


def jobs_of(reply: Message) -> list[JobInfo]:
    if not isinstance(reply, JobReply):
        raise ProtocolError(f"unexpected {reply.KIND!r} in reply to a job call", field="kind")
    return [JobInfo.from_wire(j) for j in reply.jobs]


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not 1 <= len(job_id) <= 128:
        raise InvalidRequest("job_id must be a job id such as j_0123...", field="job_id")
    return job_id


def train_params(given: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters to send: those given (None dropped), checked by ``TrainParams``."""
    params = {k: v for k, v in given.items() if v is not None}
    if isinstance(params.get("target_modules"), str):
        params["target_modules"] = [params["target_modules"]]
    if "target_modules" in params:
        params["target_modules"] = list(params["target_modules"])
    TrainParams.from_dict(params)  # InvalidRequest naming the field, before sending
    return params


def read_dataset(dataset: str | os.PathLike[str] | bytes, max_bytes: int) -> tuple[str, bytes]:
    """``(dataset_uri, inline bytes)`` for a path, bytes or ``s3://`` URI; bounded in size."""
    if isinstance(dataset, bytes | bytearray | memoryview):
        data = bytes(dataset)
    elif isinstance(dataset, str) and dataset.startswith("s3://"):
        return dataset, b""
    elif isinstance(dataset, str | os.PathLike):
        path = Path(dataset)
        try:
            with path.open("rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            raise InvalidRequest(
                f"cannot read the dataset {str(path)!r}: {exc.strerror}", field="dataset"
            ) from None
    else:
        raise InvalidRequest(
            "dataset must be a path, bytes or an s3://bucket/key URI", field="dataset"
        )
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"the dataset holds over {max_bytes} bytes, the upload limit", field="dataset"
        )
    if not data:
        raise InvalidRequest("the dataset is empty", field="dataset")
    return "", data


def build_submit(
    api_key: str,
    tenant: str | None,
    adapter: str,
    dataset: str | os.PathLike[str] | bytes,
    *,
    params: Mapping[str, Any],
    from_version: int | None,
    fresh: bool,
    max_dataset_bytes: int,
) -> tuple[TrainSubmit, bytes]:
    """The submission and its dataset frame (argument errors raised before anything is sent)."""
    if not isinstance(adapter, str) or not adapter:
        raise InvalidRequest("adapter must be an adapter name", field="adapter")
    uri, data = read_dataset(dataset, max_dataset_bytes)
    request = TrainSubmit(
        request_id=new_request_id(),
        api_key=api_key,
        adapter=adapter,
        params=train_params(params),
        dataset_uri=uri,
        from_version=from_version,
        fresh=bool(fresh),
        tenant=tenant,
    )
    return request, data


def job_request(kind: type[JobRequest], api_key: str, tenant: str | None, **kw: Any) -> Any:
    return kind(request_id=new_request_id(), api_key=api_key, tenant=tenant, **kw)


def job_reply_or_raise(reply: object) -> Message | None:
    """A job message as it is; an error raised; anything else ProtocolError (None: ignore)."""
    if isinstance(reply, JobReply | JobProgress):
        return reply
    outcome = interpret_reply(reply)  # type: ignore[arg-type]  # raises for errors
    if outcome is None:
        return None
    raise ProtocolError("unexpected reply to a job call", field="kind")


# --- the blocking side ------------------------------------------------------------------------


def exchange(
    client: Client, request: JobRequest, timeout_s: float, bulk: tuple[bytes, ...] = ()
) -> Generator[Message, None, None]:
    """Send ``request`` through ``client`` and yield its job replies until a JobReply; closing
    the generator early ends a watch at the gateway. TimeoutError when the deadline passes."""
    state = client._state()
    deadline = time.monotonic() + timeout_s
    rid = request.request_id
    frames = encode(request, message_id=rid, bulk=bulk)
    done = False
    with client._register(state, rid):
        if not state.dealer.send(frames, deadline):
            raise TimeoutError(f"no answer to request {rid} within {timeout_s:g} s")
        try:
            while True:
                reply = client._next_reply(state, rid, deadline, timeout_s)
                done = isinstance(reply, ErrorReply | VajraError)  # the stream ended there
                message = job_reply_or_raise(reply)
                if message is None:
                    continue
                done = isinstance(message, JobReply)
                yield message
                if done:
                    return
        finally:
            if not done and isinstance(request, JobWatch):
                state.dealer.try_send(encode(CancelRequest(rid, request.api_key)))


def call(client: Client, request: JobRequest, timeout_s: float, bulk: bytes = b"") -> list[JobInfo]:
    """One job call's answer (its JobReply's jobs)."""
    frames: tuple[bytes, ...] = (bulk,) if isinstance(request, TrainSubmit) else ()
    for message in exchange(client, request, timeout_s, frames):
        if isinstance(message, JobReply):
            return jobs_of(message)
    raise ProtocolError("a job call ended without its reply", field="kind")  # pragma: no cover


class TrainingJob:
    """A handle on one training job (made by :meth:`Client.train` or :meth:`Client.job`)."""

    def __init__(self, client: Client, job_id: str, info: JobInfo | None = None) -> None:
        self._client = client
        self.job_id = check_job_id(job_id)
        self.last: JobInfo | None = info  # the latest state seen

    def _req(self, kind: type[JobRequest]) -> Any:
        c = self._client._calls
        return job_request(kind, c.api_key, c.tenant, job_id=self.job_id)

    def _one(self, kind: type[JobRequest], timeout_s: float | None) -> JobInfo:
        infos = call(self._client, self._req(kind), self._client._calls.timeout(timeout_s))
        if len(infos) != 1:
            raise ProtocolError("a job call answered with no job", field="jobs")
        self.last = infos[0]
        return infos[0]

    def status(self, *, timeout_s: float | None = None) -> JobInfo:
        """The job as it stands (NotFoundError if it is not this tenant's)."""
        return self._one(JobGet, timeout_s)

    def cancel(self, *, timeout_s: float | None = None) -> JobInfo:
        """Cancel: a queued job at once, a running one at its executor's next renewal."""
        return self._one(JobCancel, timeout_s)

    def resume(self, *, timeout_s: float | None = None) -> JobInfo:
        """Queue a failed or cancelled job again from its last checkpoint."""
        return self._one(JobResume, timeout_s)

    def follow(self, *, timeout_s: float | None = None) -> Generator[JobInfo, None, None]:
        """Each change of the job, then its final state (the last item), within ``timeout_s``
        (default a day; TimeoutError after). Iterate it in the thread that started it."""
        timeout = DEFAULT_FOLLOW_S if timeout_s is None else timeout_s
        for message in exchange(self._client, self._req(JobWatch), timeout):
            if isinstance(message, JobProgress):
                self.last = JobInfo.from_wire(message.job)
            elif isinstance(message, JobReply) and message.jobs:
                self.last = JobInfo.from_wire(message.jobs[0])
            else:
                continue
            yield self.last

    def wait(self, timeout_s: float | None = None) -> JobInfo:
        """Block until the job is finished; its final state. TimeoutError after ``timeout_s``."""
        deadline = time.monotonic() + (DEFAULT_FOLLOW_S if timeout_s is None else timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {self.job_id} did not finish in time")
            for info in self.follow(timeout_s=left):
                if info.terminal:
                    return info

    def __repr__(self) -> str:
        status = self.last.status if self.last else "?"
        return f"<TrainingJob {self.job_id} {status}>"


def submit(
    client: Client,
    adapter: str,
    dataset: str | os.PathLike[str] | bytes,
    *,
    params: Mapping[str, Any],
    from_version: int | None,
    fresh: bool,
    max_dataset_bytes: int,
    timeout_s: float | None,
) -> TrainingJob:
    """Submit a job through ``client``; its handle (the job is queued when this returns)."""
    c = client._calls
    request, data = build_submit(
        c.api_key,
        c.tenant,
        adapter,
        dataset,
        params=params,
        from_version=from_version,
        fresh=fresh,
        max_dataset_bytes=max_dataset_bytes,
    )
    infos = call(client, request, c.timeout(timeout_s), data)
    if len(infos) != 1:
        raise ProtocolError("a training submission answered with no job", field="jobs")
    return TrainingJob(client, infos[0].job_id, infos[0])


def list_jobs(client: Client, limit: int, timeout_s: float | None) -> list[JobInfo]:
    """The tenant's newest ``limit`` jobs, newest first."""
    c = client._calls
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
        raise InvalidRequest("limit must be an integer in [1, 1000]", field="limit")
    return call(
        client, job_request(JobList, c.api_key, c.tenant, limit=limit), c.timeout(timeout_s)
    )


class JobsMixin:
    """The blocking client's training-job methods (:class:`~vajra.client.Client` has them)."""

    def train(
        self,
        adapter: str,
        dataset: str | os.PathLike[str] | bytes,
        *,
        epochs: int | None = None,
        learning_rate: float | None = None,
        batch_size: int | None = None,
        max_steps: int | None = None,
        rank: int | None = None,
        alpha: float | None = None,
        target_modules: Sequence[str] | None = None,
        seed: int | None = None,
        from_version: int | None = None,
        fresh: bool = False,
        max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES,
        timeout_s: float | None = None,
        **more: Any,
    ) -> TrainingJob:
        """Queue a fine-tuning job of ``adapter`` on ``dataset`` (a JSON Lines path, its
        bytes, or ``s3://...``); its handle. ``more``: other TrainParams fields
        (``grad_accum_steps``, ``weight_decay``, ``checkpoint_every``, ...). The job starts
        from ``from_version`` (default: the active version), or ``fresh`` from a new adapter
        of ``rank``/``target_modules``. Bad input is refused before anything is queued."""
        params = dict(more, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size)
        params.update(max_steps=max_steps, rank=rank, alpha=alpha, seed=seed)
        params.update(target_modules=target_modules)
        return submit(
            cast("Client", self),
            adapter,
            dataset,
            params=params,
            from_version=from_version,
            fresh=fresh,
            max_dataset_bytes=max_dataset_bytes,
            timeout_s=timeout_s,
        )

    def job(self, job_id: str) -> TrainingJob:
        """A handle on one of this tenant's jobs (nothing is sent until it is used)."""
        return TrainingJob(cast("Client", self), job_id)

    def jobs(self, *, limit: int = 100, timeout_s: float | None = None) -> list[JobInfo]:
        """This tenant's newest ``limit`` training jobs, newest first."""
        return list_jobs(cast("Client", self), limit, timeout_s)
