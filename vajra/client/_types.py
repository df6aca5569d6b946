"""Value types of the client SDK and the protocol logic both clients share.

:class:`~vajra.client.AsyncClient` and :class:`~vajra.client.Client` only move frames and
keep time. What a request looks like (:func:`build_infer_request`, :func:`request_frames`),
which request a reply belongs to (:func:`decode_reply`) and what a reply means
(:func:`interpret_reply`) live here, once, so the two clients cannot drift apart.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from vajra.bus.codec import DecodeError, decode, encode
from vajra.bus.messages import (
    AdapterDelete,
    AdapterList,
    AdapterPush,
    AdapterReply,
    AdminReply,
    AdminRequest,
    CancelRequest,
    ClusterStatusReply,
    ClusterStatusRequest,
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    PingRequest,
    PongReply,
    StatsReply,
    StatsRequest,
    TenantInfo,
    TokenChunk,
    UsageQuery,
    UsageReply,
    WhoAmIRequest,
)
from vajra.errors import (
    InvalidRequest,
    PayloadTooLarge,
    ProtocolError,
    VajraError,
    error_from_code,
)

#: What a client hands to :func:`interpret_reply`: a decoded message, or the error that
#: stands in for one (a frame for this request that did not decode, or the client closing).
Reply = Message | VajraError

#: Every request a client sends; each is answered by its ``request_id``.
Request = (
    InferRequest
    | StatsRequest
    | PingRequest
    | WhoAmIRequest
    | UsageQuery
    | AdminRequest
    | ClusterStatusRequest
    | AdapterPush
    | AdapterList
    | AdapterDelete
)
#: Replies handed back as they are, for the client method to turn into its public value.
_PLAIN_REPLIES = (TenantInfo, UsageReply, AdminReply, ClusterStatusReply, AdapterReply, PongReply)

T = TypeVar("T")

#: Replies a streaming request may receive beyond one chunk per token (the final result, and
#: some room for a gateway that flushes text without a token).
_STREAM_REPLY_SLACK = 8
#: Replies a non-streaming request or a stats request may receive: exactly one is expected.
_SINGLE_REPLY_CAPACITY = 2


@dataclass(frozen=True, slots=True)
class Usage:
    """What one request cost. ``gpu_ms`` is measured by the executor."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    gpu_ms: float
    #: Time the request waited for an executor; a measurement, left out of equality.
    queue_ms: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant: what :meth:`~vajra.client.AsyncClient.whoami` answers."""

    tenant_id: str
    name: str


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """A tenant's running usage totals, as the ledger recorded them."""

    tenant_id: str
    name: str
    requests: int
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new API key (shown only here) and the tenant it belongs to."""

    tenant_id: str
    name: str
    api_key: str


@dataclass(frozen=True, slots=True)
class ExecutorStatus:
    """One live executor's last heartbeat."""

    executor_id: str
    queue_depth: int
    running: int
    resident_adapters: int
    free_memory_bytes: int


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """The answer to :meth:`~vajra.client.Client.infer`."""

    request_id: str
    text: str
    tokens: list[int]
    finish_reason: str
    usage: Usage
    executor_id: str


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One piece of a streamed answer: the text and tokens produced since the previous chunk.

    The last chunk of a stream has ``finish_reason`` and ``usage`` set; its ``text`` holds
    whatever the final result carried beyond the earlier chunks (usually nothing).
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class StreamProgress:
    """What one stream has delivered so far; owned by the stream that reads the replies."""

    parts: list[str] = field(default_factory=list)
    chars: int = 0
    tokens: int = 0
    next_index: int = 0
    finished: bool = False

    @property
    def text(self) -> str:
        return "".join(self.parts)


def new_request_id() -> str:
    return uuid.uuid4().hex


def resolve_timeout(timeout_s: float | None, default_s: float) -> float:
    """The timeout for one call: ``timeout_s`` or the client's default; must be positive."""
    timeout = default_s if timeout_s is None else timeout_s
    if not (isinstance(timeout, int | float) and math.isfinite(timeout) and timeout > 0):
        raise InvalidRequest(
            f"timeout_s must be a positive number of seconds, got {timeout!r}", field="timeout_s"
        )
    return float(timeout)


def build_infer_request(
    *,
    api_key: str,
    tenant: str | None,
    prompt: str,
    adapter: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: str | Sequence[str] | None,
    seed: int | None,
    stream: bool,
    timeout_s: float,
    request_id: str | None = None,
) -> InferRequest:
    """The wire request for one generation call; ``deadline_ms`` equals the call's timeout.

    ``stop`` may be one string or a sequence of strings. Values are checked by the gateway,
    which answers with :class:`~vajra.errors.InvalidRequest` naming the field.
    """
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    return InferRequest(
        request_id=request_id or new_request_id(),
        api_key=api_key,
        prompt=prompt,
        adapter=adapter,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=stops,
        seed=seed,
        stream=stream,
        deadline_ms=max(1, round(timeout_s * 1000)),
        tenant=tenant,
    )


def build_stats_request(api_key: str = "", request_id: str | None = None) -> StatsRequest:
    return StatsRequest(request_id=request_id or new_request_id(), api_key=api_key)


def cancel_frames(request: Request) -> list[bytes] | None:
    """The frames that cancel ``request`` at the gateway, or None when it is not cancellable
    (only generations are: they hold an executor's row)."""
    if not isinstance(request, InferRequest):
        return None
    return encode(CancelRequest(request_id=request.request_id, api_key=request.api_key))


def request_frames(request: Request, bulk: Sequence[bytes] = ()) -> list[bytes]:
    """Frames to send; the message id is the request id, so replies can name it either way.

    ``bulk``: the raw frames an :class:`~vajra.bus.messages.AdapterPush` carries.
    """
    return encode(request, message_id=request.request_id, bulk=bulk)


# --- adapters ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """One version of one of the caller's adapters."""

    name: str
    version: int
    digest: str  # sha256 hex over adapter_config.json then adapter_model.safetensors
    size_bytes: int
    rank: int
    active: bool = False
    lora_alpha: float = 0.0
    target_modules: tuple[str, ...] = ()
    created_ms: int = 0

    @property
    def ref(self) -> str:
        """``NAME@VERSION``: what a request names to use exactly this version."""
        return f"{self.name}@{self.version}"


ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def read_adapter_dir(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` bytes of a PEFT adapter directory.

    ``path`` may also name either file inside it. Raises InvalidRequest (field ``path``) when
    a file is missing; a directory holding only a pickled ``adapter_model.bin`` is refused
    here, since only safetensors is accepted.
    """
    p = Path(path)
    if p.is_file():
        p = p.parent
    config, weights = p / ADAPTER_CONFIG_FILE, p / ADAPTER_WEIGHTS_FILE
    if not config.is_file():
        raise InvalidRequest(f"{p} has no {ADAPTER_CONFIG_FILE}", field="path")
    if not weights.is_file():
        if (p / "adapter_model.bin").exists():
            raise InvalidRequest(
                f"{p} holds adapter_model.bin (a pickle); only safetensors is accepted: "
                "save with safe_serialization=True",
                field="path",
            )
        raise InvalidRequest(f"{p} has no {ADAPTER_WEIGHTS_FILE}", field="path")
    return config.read_bytes(), weights.read_bytes()


def build_adapter_push(
    *, api_key: str, tenant: str | None, name: str, request_id: str | None = None
) -> AdapterPush:
    return AdapterPush(
        request_id=request_id or new_request_id(), api_key=api_key, name=name, tenant=tenant
    )


def build_adapter_list(*, api_key: str, tenant: str | None) -> AdapterList:
    return AdapterList(request_id=new_request_id(), api_key=api_key, tenant=tenant)


def build_adapter_delete(
    *, api_key: str, tenant: str | None, name: str, version: int | None
) -> AdapterDelete:
    """``name`` may also be ``NAME@VERSION`` (then ``version`` must be None or equal)."""
    base, at, v = name.partition("@")
    if at:
        if not (v.isascii() and v.isdigit()) or (version is not None and int(v) != version):
            raise InvalidRequest("adapter must be NAME or NAME@VERSION", field="name")
        name, version = base, int(v)
    return AdapterDelete(
        request_id=new_request_id(), api_key=api_key, name=name, version=version, tenant=tenant
    )


def adapter_infos(outcome: object) -> list[AdapterInfo]:
    """The adapters an :class:`~vajra.bus.messages.AdapterReply` names (ProtocolError if not one)."""
    reply = expect(outcome, AdapterReply)
    return [
        AdapterInfo(
            name=a.name,
            version=a.version,
            digest=a.digest,
            size_bytes=a.size_bytes,
            rank=a.rank,
            active=a.active,
            lora_alpha=a.lora_alpha,
            target_modules=tuple(a.target_modules),
            created_ms=a.created_ms,
        )
        for a in reply.adapters
    ]


def check_upload_size(config_json: bytes, weights: bytes, limit: int) -> None:
    """Refuse an upload larger than the gateway takes (``limit`` 0: the gateway did not say).

    Checked before sending: ZeroMQ would drop a too-large message before the gateway could
    answer, and the caller would only see a timeout.
    """
    size = len(config_json) + len(weights)
    if limit and size > limit:
        raise PayloadTooLarge(
            f"the adapter's files hold {size} bytes; the gateway accepts at most {limit}",
            field="weights",
        )


def single_adapter(outcome: object) -> AdapterInfo:
    infos = adapter_infos(outcome)
    if len(infos) != 1:
        raise ProtocolError(f"expected one adapter in the reply, got {len(infos)}", field="kind")
    return infos[0]


def reply_capacity(request: Request) -> int:
    """How many replies ``request`` may receive under the protocol (bounds its reply queue)."""
    if isinstance(request, InferRequest) and request.stream:
        return max(0, request.max_tokens) + _STREAM_REPLY_SLACK
    return _SINGLE_REPLY_CAPACITY


def decode_reply(frames: Sequence[bytes]) -> tuple[str, Reply]:
    """Decode one reply and name the request it belongs to ("" when no id can be recovered).

    A frame that does not decode yields its :class:`~vajra.bus.codec.DecodeError` as the reply,
    addressed to whatever request id (or message id) could be recovered from it, so a mangled
    answer fails its own request at once instead of leaving it to time out.
    """
    try:
        message = decode(frames).message
    except DecodeError as exc:
        return exc.request_id or exc.message_id, exc
    request_id = getattr(message, "request_id", "")
    return (request_id if isinstance(request_id, str) else ""), message


def interpret_reply(
    reply: Reply, stream: StreamProgress | None = None
) -> InferenceResult | StreamChunk | dict[str, int] | Message | None:
    """Turn one reply into what the SDK hands back, or raise the error it stands for.

    - an ``ErrorReply`` raises :func:`~vajra.errors.error_from_code` of it; a
      :class:`~vajra.errors.VajraError` standing in for a reply is raised as it is;
    - an ``InferResult`` becomes an :class:`InferenceResult`, or, when ``stream`` is given,
      the stream's final :class:`StreamChunk` (with ``finish_reason`` and ``usage``);
    - a ``TokenChunk`` becomes a :class:`StreamChunk` when ``stream`` is given; for a
      non-streaming call it is ignored (None: keep waiting);
    - a ``StatsReply`` becomes its counters;
    - anything else raises :class:`~vajra.errors.ProtocolError`.

    ``stream`` is updated; after the final chunk or any error, ``stream.finished`` is True.
    """
    try:
        return _interpret(reply, stream)
    except VajraError:
        if stream is not None:
            stream.finished = True
        raise


def _interpret(
    reply: Reply, stream: StreamProgress | None
) -> InferenceResult | StreamChunk | dict[str, int] | Message | None:
    if isinstance(reply, VajraError):
        raise reply
    if isinstance(reply, ErrorReply):
        raise error_from_code(
            reply.code, reply.message, reply.field, retry_after_ms=reply.retry_after_ms
        )
    if isinstance(reply, InferResult):
        usage = Usage(
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            total_tokens=reply.prompt_tokens + reply.completion_tokens,
            gpu_ms=reply.gpu_ms,
            queue_ms=reply.queue_ms,
        )
        if stream is None:
            return InferenceResult(
                request_id=reply.request_id,
                text=reply.text,
                tokens=reply.token_ids,
                finish_reason=reply.finish_reason,
                usage=usage,
                executor_id=reply.executor_id,
            )
        # For streams the result repeats the full text; hand back only what is new.
        delivered = stream.text
        rest = reply.text[stream.chars :] if reply.text.startswith(delivered) else ""
        rest_tokens = reply.token_ids[stream.tokens :]
        stream.finished = True
        return StreamChunk(
            request_id=reply.request_id,
            index=stream.next_index,
            text=rest,
            token_ids=rest_tokens,
            finish_reason=reply.finish_reason,
            usage=usage,
        )
    if isinstance(reply, TokenChunk):
        if stream is None:
            return None
        stream.parts.append(reply.text)
        stream.chars += len(reply.text)
        stream.tokens += len(reply.token_ids)
        stream.next_index = max(stream.next_index, reply.index + 1)
        return StreamChunk(reply.request_id, reply.index, reply.text, reply.token_ids)
    if isinstance(reply, StatsReply):
        return dict(reply.counters)
    if isinstance(reply, _PLAIN_REPLIES):
        return reply
    raise ProtocolError(f"unexpected {reply.KIND!r} message in reply to a request", field="kind")


def expect(outcome: object, cls: type[T]) -> T:
    """``outcome`` as a ``cls``, or :class:`~vajra.errors.ProtocolError` for the wrong reply."""
    if not isinstance(outcome, cls):
        raise ProtocolError(
            f"expected a reply giving {cls.__name__}, got {type(outcome).__name__}",
            field="kind",
        )
    return outcome
