"""Every message that travels between Vajra processes, one frozen dataclass per kind.

A message is two frames on the wire: a header ``[version, kind, message_id, reply_to,
trace_id]`` and a msgpack map holding the dataclass fields (see :mod:`vajra.bus.codec`).
Field names carry their units (``deadline_ms``, ``max_tokens``, ``gpu_ms``). New fields
always get defaults, so an older sender's frames still decode.

Data flows left to right::

    client ──InferRequest──▶ gateway ──InferWork──▶ scheduler ──InferWork──▶ executor
    client ◀──TokenChunk / InferResult / ErrorReply── gateway ◀── executor
    executor ──ExecutorHello / LoadReport──▶ scheduler ──ErrorReply (executor lost)──▶ gateway
    executor ──UsageEvent──▶ ledger ──UsageAck──▶ executor
    scheduler ══RequestEvent══▶ predictor (PUB/SUB)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NewType

RequestId = NewType("RequestId", str)
TenantId = NewType("TenantId", str)
ExecutorId = NewType("ExecutorId", str)
EventId = NewType("EventId", str)

PROTOCOL_VERSION = 1


@dataclass(frozen=True, slots=True)
class Message:
    """Base of all wire messages; ``KIND`` names the message on the wire."""

    KIND: ClassVar[str] = ""


# --- client <-> gateway -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InferRequest(Message):
    """A client's generation request. ``adapter`` is ``NAME`` or ``NAME@VERSION``; None = base."""

    KIND: ClassVar[str] = "infer"
    request_id: str
    api_key: str
    prompt: str
    adapter: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    deadline_ms: int = 30_000
    tenant: str | None = None


@dataclass(frozen=True, slots=True)
class TokenChunk(Message):
    """Streamed text produced since the previous chunk of the same request."""

    KIND: ClassVar[str] = "chunk"
    request_id: str
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class InferResult(Message):
    """The final answer; for streams it carries no text beyond what the chunks carried."""

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


@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """A typed failure; ``code`` is a :class:`vajra.errors.ErrorCode` value."""

    KIND: ClassVar[str] = "error"
    request_id: str
    code: str
    message: str
    field: str | None = None
    retriable: bool = False


@dataclass(frozen=True, slots=True)
class StatsRequest(Message):
    """Ask an actor for its counters (answered with :class:`StatsReply`)."""

    KIND: ClassVar[str] = "stats"
    request_id: str


@dataclass(frozen=True, slots=True)
class StatsReply(Message):
    KIND: ClassVar[str] = "stats-reply"
    request_id: str
    actor: str
    counters: dict[str, int]


# --- gateway -> scheduler -> executor ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class InferWork(Message):
    """An authenticated, validated request on its way to an executor.

    ``deadline_unix_ms`` is absolute (wall clock) so every hop can check it.
    """

    KIND: ClassVar[str] = "work"
    request_id: str
    tenant_id: str
    prompt: str
    adapter: str | None
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    deadline_unix_ms: int
    gateway_id: str
    received_unix_ms: int = 0


# --- executor <-> scheduler ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecutorHello(Message):
    """An executor (re)announcing itself; a new ``incarnation`` means it restarted."""

    KIND: ClassVar[str] = "hello"
    executor_id: str
    incarnation: str
    model: str
    max_batch_size: int
    max_queue: int


@dataclass(frozen=True, slots=True)
class LoadReport(Message):
    """Periodic load and liveness report; ``finished_ids`` lists requests done since the last."""

    KIND: ClassVar[str] = "load"
    executor_id: str
    incarnation: str
    queue_depth: int
    running: int
    finished_ids: list[str] = field(default_factory=list)
    resident_adapters: list[str] = field(default_factory=list)
    draining: bool = False


# --- executor <-> ledger ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageEvent(Message):
    """Measured usage of one request; the sender resends until acknowledged."""

    KIND: ClassVar[str] = "usage"
    event_id: str
    tenant_id: str
    request_id: str
    executor_id: str
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int
    ts_unix_ms: int


@dataclass(frozen=True, slots=True)
class UsageAck(Message):
    KIND: ClassVar[str] = "usage-ack"
    event_ids: list[str]


# --- events (PUB/SUB) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestEvent(Message):
    """Published by the scheduler for every placed request; the predictor learns from these."""

    KIND: ClassVar[str] = "request-event"
    request_id: str
    tenant_id: str
    adapter: str | None
    executor_id: str
    ts_unix_ms: int
    prompt_chars: int = 0


ALL_MESSAGES: tuple[type[Message], ...] = (
    InferRequest,
    TokenChunk,
    InferResult,
    ErrorReply,
    StatsRequest,
    StatsReply,
    InferWork,
    ExecutorHello,
    LoadReport,
    UsageEvent,
    UsageAck,
    RequestEvent,
)
