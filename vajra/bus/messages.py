"""Every message that travels between Vajra processes, one frozen msgspec ``Struct`` per kind.

A message is two frames on the wire: a header ``[version, kind, message_id, reply_to,
trace_id]`` and a msgpack map holding the struct fields (see :mod:`vajra.bus.codec`).
Field names carry their units (``deadline_ms``, ``max_tokens``, ``gpu_ms``). New fields
always get defaults, so an older sender's frames still decode.

Why ``msgspec.Struct`` rather than ``@dataclass(frozen=True)``: the same frozen, typed,
declared-fields record (msgspec declares it a dataclass transform, so type checkers treat it
as one), but building one costs ~0.15 µs instead of ~2 µs (a 9-field frozen dataclass pays
``object.__setattr__`` per field) and decoding into it is faster too; every request builds and
decodes several of these in every actor on its path. Internal hops may carry several
messages in one ZeroMQ message (:mod:`vajra.bus.outbox`); each keeps these two frames.

Data flows left to right::

    client ──InferRequest──▶ gateway ──InferWork──▶ scheduler ──InferWork──▶ executor
    client ◀──TokenChunk / InferResult / ErrorReply── gateway ◀── executor
    client ──CancelRequest──▶ gateway ──CancelWork──▶ scheduler ──CancelWork──▶ executor
    gateway ──GatewayHello──▶ scheduler ──GatewayHello──▶ every executor
    client ──AdapterPush (+2 bulk frames) / AdapterList / AdapterDelete / AdapterRollback /
             AdapterMerge──▶ gateway ──AdapterReply──▶ client
    client ──TrainSubmit (+1 bulk frame) / JobGet / JobList / JobCancel / JobResume──▶ gateway ──JobReply──▶ client
    client ──JobWatch──▶ gateway ──JobProgress…, JobReply──▶ client
    gateway|executor ──AdapterSwap──▶ scheduler ──AdapterWarm──▶ executors ──AdapterWarmed──▶ scheduler
    scheduler ──AdapterSwapDone──▶ gateway|executor (which then flips the active pointer)
    executor ──ExecutorHello / LoadReport──▶ scheduler ──ErrorReply (executor lost)──▶ gateway
    gateway|executor ──JobQueued──▶ scheduler ──JobOffer──▶ the executor placement chose
    executor ──UsageEvent──▶ ledger ──UsageAck──▶ executor
    scheduler ══RequestEvent══▶ predictor (PUB/SUB)
    scheduler ══CapacityWanted══▶ supervisor (PUB/SUB; starts an executor when allowed)
    predictor ──AdapterTierCommand / AdapterForecasts──▶ scheduler ──▶ executors
"""

# Over 400 lines: the whole wire schema in one place, so every message kind is read together.

from __future__ import annotations

from typing import Any, ClassVar, NewType

import msgspec
from msgspec import field

from vajra.errors import InvalidRequest
from vajra.policies.decoding import SamplingParams, StructuredOutput

RequestId = NewType("RequestId", str)
TenantId = NewType("TenantId", str)
ExecutorId = NewType("ExecutorId", str)
EventId = NewType("EventId", str)

PROTOCOL_VERSION = 1


class Message(msgspec.Struct, frozen=True):
    """Base of all wire messages; ``KIND`` names the message on the wire.

    ``BULK_FRAMES``: how many raw byte frames follow the body on the wire (adapter files);
    they are never inside msgpack and arrive on :attr:`vajra.bus.codec.Envelope.bulk`.
    """

    KIND: ClassVar[str] = ""
    BULK_FRAMES: ClassVar[int] = 0


# --- decoding parameters and log-probabilities (parts of the generation messages) ---------


class Structured(msgspec.Struct, frozen=True):
    """:class:`~vajra.policies.decoding.StructuredOutput` on the wire: ``kind`` and ``spec``."""

    kind: str
    spec: str = ""


class Sampling(msgspec.Struct, frozen=True, omit_defaults=True):
    """:class:`~vajra.policies.decoding.SamplingParams` on the wire: the same fields, names and
    defaults (a test keeps them equal), typed but not range-checked, so a bad value decodes and
    :meth:`params` refuses it with an InvalidRequest naming the field. Fields left at their
    defaults are not sent."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured: Structured | None = None

    @classmethod
    def of(cls, p: SamplingParams) -> Sampling:
        s = p.structured
        return cls(
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            stop=p.stop,
            seed=p.seed,
            stop_token_ids=p.stop_token_ids,
            min_tokens=p.min_tokens,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            ignore_eos=p.ignore_eos,
            logprobs=p.logprobs,
            prompt_logprobs=p.prompt_logprobs,
            structured=None if s is None else Structured(s.kind, s.spec),
        )

    def params(self) -> SamplingParams:
        """The engine's parameters; raises InvalidRequest naming the first bad field."""
        s = self.structured
        try:
            return SamplingParams(
                max_tokens=self.max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                stop=self.stop,
                seed=self.seed,
                stop_token_ids=self.stop_token_ids,
                min_tokens=self.min_tokens,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                ignore_eos=self.ignore_eos,
                logprobs=self.logprobs,
                prompt_logprobs=self.prompt_logprobs,
                structured=None if s is None else StructuredOutput(s.kind, s.spec),  # type: ignore[arg-type]
            )
        except (TypeError, ValueError, RecursionError) as exc:  # never expected: be typed anyway
            raise InvalidRequest(f"invalid decoding parameters: {exc}", field="sampling") from None


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One token's log-probability and its most likely alternatives (sent as an array).

    ``token`` is the token's own text (a piece of a multi-byte character shows as U+FFFD);
    ``logprob`` is None only for a prompt's first token; ``top`` holds ``(token_id, token,
    logprob)`` of the most likely tokens at that position, most likely first.
    """

    token_id: int
    token: str
    logprob: float | None
    top: tuple[tuple[int, str, float], ...] = ()


# --- client <-> gateway -------------------------------------------------------------------


class InferRequest(Message, frozen=True):
    """A client's generation request. ``adapter`` is ``NAME`` or ``NAME@VERSION``; None = base."""

    KIND: ClassVar[str] = "infer"
    request_id: str
    api_key: str
    prompt: str
    adapter: str | None = None
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False
    deadline_ms: int = 30_000
    tenant: str | None = None


class TokenChunk(Message, frozen=True):
    """Streamed text produced since the previous chunk of the same request.

    ``logprobs``: one entry per token of ``token_ids`` when the request asked for them;
    ``prompt_logprobs``: every prompt token's entry, on the first chunk, when asked for.
    """

    KIND: ClassVar[str] = "chunk"
    request_id: str
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


class InferResult(Message, frozen=True):
    """The final answer; for streams it carries no text beyond what the chunks carried.

    ``logprobs`` and ``prompt_logprobs`` (when asked for): for a stream, only what no chunk
    carried (usually nothing); otherwise all of them.
    """

    KIND: ClassVar[str] = "result"
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    gpu_ms: float
    executor_id: str = ""
    queue_ms: float = 0.0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


class ErrorReply(Message, frozen=True):
    """A typed failure; ``code`` is a :class:`vajra.errors.ErrorCode` value.

    ``retry_after_ms``: for ``rate_limited`` / ``concurrency_limited``, when a retry may pass.
    """

    KIND: ClassVar[str] = "error"
    request_id: str
    code: str
    message: str
    field: str | None = None
    retriable: bool = False
    retry_after_ms: int = 0


class CancelRequest(Message, frozen=True):
    """The caller gives up on its request ``request_id`` (its own id), e.g. a dropped stream.

    ``api_key`` must be the key the request was sent with. The gateway forgets the request,
    answers it with a ``cancelled`` ErrorReply, and tells its executor, which drops the row at
    its next step and bills what it computed. A cancel for a request that already ended (or
    that the gateway never saw) is not answered.
    """

    KIND: ClassVar[str] = "cancel"
    request_id: str
    api_key: str = ""


class PingRequest(Message, frozen=True):
    """Is the gateway up? Needs no key and reveals nothing (answered :class:`PongReply`)."""

    KIND: ClassVar[str] = "ping"
    request_id: str


class PongReply(Message, frozen=True):
    KIND: ClassVar[str] = "pong"
    request_id: str


class StatsRequest(Message, frozen=True):
    """Ask an actor for its counters (answered with :class:`StatsReply`).

    The gateway answers only a valid tenant key or the admin key (``api_key``).
    """

    KIND: ClassVar[str] = "stats"
    request_id: str
    api_key: str = ""


class StatsReply(Message, frozen=True):
    KIND: ClassVar[str] = "stats-reply"
    request_id: str
    actor: str
    counters: dict[str, int]


# --- client <-> gateway: tenant queries and administration (the HTTP bridge uses these) ----


class WhoAmIRequest(Message, frozen=True):
    """Which tenant does ``api_key`` belong to? Answered with :class:`TenantInfo`."""

    KIND: ClassVar[str] = "whoami"
    request_id: str
    api_key: str


class TenantInfo(Message, frozen=True):
    """The caller's tenant, and the gateway's limits a client checks before sending.

    ``max_adapter_bytes``: the most an adapter upload's files may hold together (0: not said).
    A larger upload would be cut off by ZeroMQ before the gateway could answer it.
    """

    KIND: ClassVar[str] = "tenant-info"
    request_id: str
    tenant_id: str
    name: str
    max_adapter_bytes: int = 0


class UsageQuery(Message, frozen=True):
    """The caller's own usage totals. ``tenant`` (an id or a name), when given, must be the
    caller's own tenant; any other value is answered ``not_found``, whether or not it exists.
    The admin key (``http.admin_key``) may name any tenant (and must name one).

    ``start_unix_ms`` / ``end_unix_ms`` (None: open) select the UTC days of usage in the
    reply's ``rows`` (a day is in when any of it is in ``[start, end)``); ``group_by``
    (``adapter``, ``kind``, ``day`` or None) is how the caller will group them.
    """

    KIND: ClassVar[str] = "usage-query"
    request_id: str
    api_key: str
    tenant: str | None = None
    start_unix_ms: int | None = None
    end_unix_ms: int | None = None
    group_by: str | None = None


class UsageRowWire(msgspec.Struct, frozen=True):
    """One (UTC day, adapter, version, kind) bucket of a tenant's usage (in :class:`UsageReply`)."""

    day: int  # days since the Unix epoch (UTC)
    adapter: str  # "" : the base model
    adapter_version: int
    kind: str  # "inference" | "training"
    events: int
    gpu_us: int
    billed_ms: int
    prompt_tokens: int
    completion_tokens: int
    gradients: int


class UsageReply(Message, frozen=True):
    KIND: ClassVar[str] = "usage-reply"
    request_id: str
    tenant_id: str
    name: str
    requests: int
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int
    billed_ms: int = 0
    gradients: int = 0
    rows: list[UsageRowWire] = field(default_factory=list)
    group_by: str | None = None


class AdminRequest(Message, frozen=True):
    """Tenant and key administration, authorised by the admin key (``http.admin_key``).

    ``action`` is one of ``create_tenant`` (``tenant``: the new name), ``create_key`` and
    ``delete_tenant`` (``tenant``: a name or id) and ``revoke_key`` (``api_key``: the key).
    Answered with :class:`AdminReply`; revoking takes effect on the gateway's next request.
    """

    KIND: ClassVar[str] = "admin"
    request_id: str
    admin_key: str
    action: str
    tenant: str | None = None
    api_key: str | None = None


class AdminReply(Message, frozen=True):
    """``api_key`` is set (shown once) by ``create_tenant`` and ``create_key``."""

    KIND: ClassVar[str] = "admin-reply"
    request_id: str
    action: str
    tenant_id: str = ""
    name: str = ""
    api_key: str | None = None


class ClusterStatusRequest(Message, frozen=True):
    """Ask the gateway for every live executor's last heartbeat (:class:`ClusterStatusReply`).

    Answered only for a valid tenant key or the admin key (``api_key``).
    """

    KIND: ClassVar[str] = "cluster-status"
    request_id: str
    api_key: str = ""


class ClusterStatusReply(Message, frozen=True):
    """One entry per live executor, as parallel lists (index ``i`` is one executor)."""

    KIND: ClassVar[str] = "cluster-status-reply"
    request_id: str
    executor_ids: list[str] = field(default_factory=list)
    queue_depths: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    resident_adapters: list[int] = field(default_factory=list)
    free_memory_bytes: list[int] = field(default_factory=list)


# --- client <-> gateway: the adapter registry ----------------------------------------------


class AdapterPush(Message, frozen=True):
    """Upload a PEFT LoRA adapter as the next version of ``name`` (answered :class:`AdapterReply`).

    Two bulk frames follow the body: ``adapter_config.json`` then
    ``adapter_model.safetensors``, as raw bytes.
    """

    KIND: ClassVar[str] = "adapter-push"
    BULK_FRAMES: ClassVar[int] = 2
    request_id: str
    api_key: str
    name: str
    tenant: str | None = None
    # Version metadata (see docs/hot-swap.md); a push stages, warms, then activates the
    # version unless ``activate`` is False (then it stays staged: ``NAME@VERSION`` only).
    activate: bool = True
    dataset_digest: str = ""
    hyperparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class AdapterList(Message, frozen=True):
    """List the caller's adapters, every version (answered :class:`AdapterReply`); with
    ``name``, only that adapter's versions (NotFoundError when it has none)."""

    KIND: ClassVar[str] = "adapter-list"
    request_id: str
    api_key: str
    tenant: str | None = None
    name: str | None = None


class AdapterMerge(Message, frozen=True):
    """Register the exact weighted sum of two versions of ``name`` as its next version
    (answered :class:`AdapterReply`; see :mod:`vajra.adapters.merge`): ``versions`` and
    ``weights`` hold two entries each. Activated the warm way unless ``activate`` is False."""

    KIND: ClassVar[str] = "adapter-merge"
    request_id: str
    api_key: str
    name: str
    versions: list[int]
    weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    tenant: str | None = None
    activate: bool = True


class AdapterRollback(Message, frozen=True):
    """Make ``version`` of ``name`` active again the warm way (answered :class:`AdapterReply`
    holding that version)."""

    KIND: ClassVar[str] = "adapter-rollback"
    request_id: str
    api_key: str
    name: str
    version: int
    tenant: str | None = None


class AdapterDelete(Message, frozen=True):
    """Delete one version of ``name``, or all of it when ``version`` is None."""

    KIND: ClassVar[str] = "adapter-delete"
    request_id: str
    api_key: str
    name: str
    version: int | None = None
    tenant: str | None = None


class AdapterEntry(msgspec.Struct, frozen=True):
    """One adapter version (an item of :class:`AdapterReply`)."""

    name: str
    version: int
    digest: str
    size_bytes: int
    rank: int
    active: bool = False
    lora_alpha: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    created_ms: int = 0
    parent_version: int | None = None
    dataset_digest: str = ""
    hyperparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = "push"  # "push", "train", "merge"
    staged: bool = False  # registered, never active yet


class AdapterReply(Message, frozen=True):
    """The pushed version, the listed versions, or the deleted versions."""

    KIND: ClassVar[str] = "adapter-reply"
    request_id: str
    adapters: list[AdapterEntry] = field(default_factory=list)


# --- client <-> gateway: training jobs (docs/training-jobs.md) ------------------------------


class TrainSubmit(Message, frozen=True):
    """Queue a fine-tuning job of adapter ``adapter`` (answered :class:`JobReply`, one job).

    One bulk frame follows the body: the dataset (JSON Lines) as raw bytes, or an empty frame
    when ``dataset_uri`` names ``s3://<the cluster's bucket>/datasets/<tenant_id>/...``.
    ``params``: :meth:`vajra.policies.training.TrainParams.to_dict` keys (missing ones take
    their defaults). The job starts from ``from_version`` (None: the active version) of an
    existing adapter, or, with ``fresh``, from a new adapter of ``params`` rank and modules.
    """

    KIND: ClassVar[str] = "train-submit"
    BULK_FRAMES: ClassVar[int] = 1
    request_id: str
    api_key: str
    adapter: str
    params: dict[str, Any] = field(default_factory=dict)
    dataset_uri: str = ""
    from_version: int | None = None
    fresh: bool = False
    tenant: str | None = None


class JobInfo(msgspec.Struct, frozen=True):
    """One training job as a tenant sees it (an item of :class:`JobReply`)."""

    job_id: str
    adapter: str
    status: str  # queued, running, succeeded, failed, cancelled
    base_model: str = ""
    from_version: int | None = None
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
    result_version: int | None = None
    error: str = ""
    attempt: int = 1
    cancel_requested: bool = False


class JobGet(Message, frozen=True):
    """One of the caller's jobs (answered :class:`JobReply`); another tenant's: not found."""

    KIND: ClassVar[str] = "job-get"
    request_id: str
    api_key: str
    job_id: str
    tenant: str | None = None


class JobList(Message, frozen=True):
    """The caller's newest ``limit`` jobs, newest first (answered :class:`JobReply`)."""

    KIND: ClassVar[str] = "job-list"
    request_id: str
    api_key: str
    limit: int = 100
    tenant: str | None = None


class JobCancel(Message, frozen=True):
    """Cancel a job: a queued one at once, a running one at its executor's next lease renewal
    (answered :class:`JobReply` with the job as it stands)."""

    KIND: ClassVar[str] = "job-cancel"
    request_id: str
    api_key: str
    job_id: str
    tenant: str | None = None


class JobResume(Message, frozen=True):
    """Queue a failed or cancelled job again from its last checkpoint (answered
    :class:`JobReply`)."""

    KIND: ClassVar[str] = "job-resume"
    request_id: str
    api_key: str
    job_id: str
    tenant: str | None = None


class JobWatch(Message, frozen=True):
    """Follow a job: :class:`JobProgress` each time it changes, then :class:`JobReply` once it
    is finished (or after ``training.max_follow_s``). A ``CancelRequest`` with the same
    ``request_id`` ends the stream (answered ``cancelled``)."""

    KIND: ClassVar[str] = "job-watch"
    request_id: str
    api_key: str
    job_id: str
    tenant: str | None = None


class JobProgress(Message, frozen=True):
    """One change of a followed job; ``index`` counts the chunks of the stream from 0."""

    KIND: ClassVar[str] = "job-progress"
    request_id: str
    index: int
    job: JobInfo


class JobReply(Message, frozen=True):
    """The submitted, read, listed, cancelled or resumed jobs; a follow's last message."""

    KIND: ClassVar[str] = "job-reply"
    request_id: str
    jobs: list[JobInfo] = field(default_factory=list)


# --- gateway -> scheduler -> executor ----------------------------------------------------


class InferWork(Message, frozen=True):
    """An authenticated, validated request on its way to an executor.

    ``deadline_unix_ms`` is absolute (wall clock) so every hop can check it.
    """

    KIND: ClassVar[str] = "work"
    request_id: str  # unique across gateways and their restarts (see GatewayHello)
    tenant_id: str
    prompt: str
    adapter: str | None
    sampling: Sampling  # as the client sent it; the gateway checked that it is valid
    stream: bool
    deadline_unix_ms: int
    gateway_id: str
    received_unix_ms: int = 0
    # The adapter version resolved by the gateway at admission (``adapter`` is the caller's
    # NAME or NAME@VERSION); the whole request is served by exactly this version.
    adapter_version: int | None = None
    adapter_digest: str | None = None  # sha256 hex of config + weights
    adapter_object_key: str | None = None  # object-store prefix holding the PEFT files
    gateway_incarnation: str = ""  # the sending gateway's incarnation (see GatewayHello)
    adapter_bytes: int = 0  # the resolved version's files, together (0: none, or not said)


class CancelWork(Message, frozen=True):
    """Stop these requests (internal ids): gateway -> scheduler -> the executor holding each.

    The executor drops each row at its next step, releases its adapter and bills what it
    computed; it sends no answer (the gateway has already answered the caller).
    """

    KIND: ClassVar[str] = "cancel-work"
    request_ids: list[str]


class GatewayHello(Message, frozen=True):
    """A gateway announcing itself (at start and then periodically): gateway -> scheduler.

    The scheduler passes a new ``incarnation`` on to every executor, which then cancels the
    rows that an earlier incarnation of ``gateway_id`` sent: nobody can receive their tokens.
    """

    KIND: ClassVar[str] = "gateway-hello"
    gateway_id: str
    incarnation: str


# --- executor <-> scheduler ---------------------------------------------------------------


class ExecutorHello(Message, frozen=True):
    """An executor (re)announcing itself; a new ``incarnation`` means it restarted."""

    KIND: ClassVar[str] = "hello"
    executor_id: str
    incarnation: str
    model: str
    max_batch_size: int
    max_queue: int


class LoadReport(Message, frozen=True):
    """Periodic load and liveness report; ``finished_ids`` lists requests done since the last."""

    KIND: ClassVar[str] = "load"
    executor_id: str
    incarnation: str
    queue_depth: int
    running: int
    finished_ids: list[str] = field(default_factory=list)
    resident_adapters: list[str] = field(default_factory=list)  # digests in GPU memory
    draining: bool = False
    # Placement (Algorithm 2) and prefetch (Algorithm 1) read these; digests per tier.
    host_adapters: list[str] = field(default_factory=list)
    disk_adapters: list[str] = field(default_factory=list)
    active_adapters: int = 0  # adapters held by running requests (not evictable)
    gpu_slots: int = 0  # GPU adapter slots in all (0: unknown)
    gpu_slots_free: int = 0
    # Mean measured time of a load into each tier ("gpu": from host memory, "host": from
    # disk, "disk": from the object store) since the executor started; absent: none yet.
    tier_load_ms: dict[str, float] = field(default_factory=dict)
    # Training: the jobs running here and how many may (0: this executor does not train).
    training_jobs: list[str] = field(default_factory=list)
    training_slots: int = 0


class AdapterForecasts(Message, frozen=True):
    """Predictor -> scheduler -> every executor: the predicted next arrival (epoch ms; NaN:
    none expected) of each adapter (by digest) the predictor counts as in GPU memory, sent
    each plan tick. An executor that must evict picks the adapter expected farthest away
    while its last forecasts are fresh (least recently used otherwise)."""

    KIND: ClassVar[str] = "adapter-forecasts"
    digests: list[str]
    next_arrival_ms: list[float]
    sent_unix_ms: int


class JobQueued(Message, frozen=True):
    """A training job was queued (created, resumed, or handed back by a draining executor):
    gateway|executor -> scheduler, which places it (Algorithm 2) and offers it. A hint only:
    the job's record in Redis is the truth, and executors claim unoffered jobs after
    ``training.placement_wait_s``. ``adapter_digest``: the starting version's ("": fresh)."""

    KIND: ClassVar[str] = "job-queued"
    job_id: str
    tenant_id: str
    adapter_digest: str = ""


class JobOffer(Message, frozen=True):
    """Scheduler -> the executor placement chose: claim this queued job (if still queued)."""

    KIND: ClassVar[str] = "job-offer"
    job_id: str


class AdapterTierCommand(Message, frozen=True):
    """Move an adapter between an executor's tiers ahead of demand (the predictor sends these).

    Sent to the scheduler, which forwards it to ``executor_id``. ``action`` is "promote" (bring
    it up to ``tier``) or "demote" (drop it from ``tier`` and above); tiers: "gpu", "host",
    "disk". One-way: the executor counts what it did and reports residency in its LoadReport.
    """

    KIND: ClassVar[str] = "adapter-tier"
    executor_id: str  # "": the scheduler picks — placement's choice for a promote, every
    # executor holding the adapter above ``tier`` for a demote
    adapter_digest: str
    adapter_object_key: str
    tier: str
    action: str
    tenant_id: str = ""
    expected_ms: float | None = None  # a promote: the arrival it prepares for (epoch ms)


# --- warm hot swap: requester (gateway, executor) <-> scheduler <-> executors ----------------


class AdapterSwap(Message, frozen=True):
    """Warm ``to_digest`` wherever ``from_digest`` is held, before a pointer flip (answered
    :class:`AdapterSwapDone`; see :mod:`vajra.actors.scheduler_swaps`).

    Sent to the scheduler by a gateway (its frontend) or an executor (its dispatch socket);
    the requester flips the registry's pointer itself once answered. ``wait_ms`` bounds the
    scheduler's wait for the executors' replies.
    """

    KIND: ClassVar[str] = "adapter-swap"
    swap_id: str
    tenant_id: str
    name: str
    from_digest: str
    to_version: int
    to_digest: str
    to_object_key: str
    wait_ms: int = 10_000


class AdapterWarm(Message, frozen=True):
    """Scheduler -> every live executor: if you hold ``from_digest`` (GPU or host memory),
    load ``to_digest`` into the same tier, then answer :class:`AdapterWarmed`."""

    KIND: ClassVar[str] = "adapter-warm"
    swap_id: str
    from_digest: str
    to_digest: str
    to_object_key: str
    deadline_unix_ms: int


class AdapterWarmed(Message, frozen=True):
    """Executor -> scheduler: what :class:`AdapterWarm` did here. ``held_old``: it held the
    old version; ``loaded``: the new one is now in the same tier; ``error`` why not."""

    KIND: ClassVar[str] = "adapter-warmed"
    swap_id: str
    executor_id: str
    held_old: bool
    loaded: bool
    tier: str = ""  # "gpu" or "host" when held_old
    error: str = ""


class AdapterSwapDone(Message, frozen=True):
    """Scheduler -> requester: the warm phase ended. ``ok``: every executor that held the old
    version loaded the new one in time (``not_warmed`` lists those that did not: no reply in
    ``wait_ms``, an error, or lost meanwhile)."""

    KIND: ClassVar[str] = "adapter-swap-done"
    swap_id: str
    ok: bool
    warmed: list[str] = field(default_factory=list)
    not_warmed: list[str] = field(default_factory=list)
    error: str = ""


# --- executor <-> ledger ------------------------------------------------------------------


class UsageEvent(msgspec.Struct, frozen=True):
    """Measured usage of one request or one training step (an item of :class:`UsageBatch`).

    ``event_id`` makes it idempotent (the ledger counts an id once); ``adapter`` is the
    adapter's name ("" for the base model) and ``adapter_version`` the version that ran (0:
    none); ``kind`` is ``inference`` or ``training``; ``gradients`` (training) is trainable
    parameters x optimizer steps (:func:`vajra.policies.billing.gradients_per_step`).
    """

    event_id: str
    tenant_id: str
    request_id: str
    executor_id: str
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int
    ts_unix_ms: int
    adapter: str = ""
    adapter_version: int = 0
    kind: str = "inference"
    gradients: int = 0


class UsageBatch(Message, frozen=True):
    """Usage events, batched per engine step; the sender resends each until acknowledged."""

    KIND: ClassVar[str] = "usage"
    events: list[UsageEvent]


class UsageAck(Message, frozen=True):
    KIND: ClassVar[str] = "usage-ack"
    event_ids: list[str]


# --- events (PUB/SUB) ---------------------------------------------------------------------


class RequestEvent(msgspec.Struct, frozen=True):
    """One placed request (an item of :class:`RequestEvents`)."""

    request_id: str
    tenant_id: str
    adapter: str | None
    executor_id: str
    ts_unix_ms: int
    prompt_chars: int = 0
    adapter_digest: str | None = None  # the resolved version's digest (None: base model)
    adapter_object_key: str | None = None
    adapter_bytes: int = 0  # its size (0: not said); prefetch plans load times with it


class RequestEvents(Message, frozen=True):
    """Published by the scheduler, one per batch of placed requests; the predictor learns."""

    KIND: ClassVar[str] = "request-events"
    events: list[RequestEvent]
    # Mean measured load time into each tier across the executors' last reports (see
    # LoadReport.tier_load_ms): what prefetch plans with.
    tier_load_ms: dict[str, float] = field(default_factory=dict)


class CapacityWanted(Message, frozen=True):
    """Published by the scheduler when a request found no room and provisioning decided to
    start an executor (``[provisioning]``): the supervisor starts executors until this many
    serve (never more than its own ``max_executors``). Idempotent: a repeat asks for nothing
    more."""

    KIND: ClassVar[str] = "capacity-wanted"
    executors: int  # executors wanted serving: those the scheduler knows plus this start
    waiting: int = 0  # requests held for room when it was sent


ALL_MESSAGES: tuple[type[Message], ...] = (
    InferRequest,
    TokenChunk,
    InferResult,
    ErrorReply,
    CancelRequest,
    PingRequest,
    PongReply,
    CancelWork,
    GatewayHello,
    StatsRequest,
    StatsReply,
    InferWork,
    ExecutorHello,
    LoadReport,
    AdapterForecasts,
    JobQueued,
    JobOffer,
    AdapterTierCommand,
    AdapterSwap,
    AdapterWarm,
    AdapterWarmed,
    AdapterSwapDone,
    UsageBatch,
    UsageAck,
    RequestEvents,
    CapacityWanted,
    WhoAmIRequest,
    TenantInfo,
    UsageQuery,
    UsageReply,
    AdminRequest,
    AdminReply,
    ClusterStatusRequest,
    ClusterStatusReply,
    AdapterPush,
    AdapterList,
    AdapterDelete,
    AdapterReply,
    AdapterRollback,
    AdapterMerge,
    TrainSubmit,
    JobGet,
    JobList,
    JobCancel,
    JobResume,
    JobWatch,
    JobProgress,
    JobReply,
)
