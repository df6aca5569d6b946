"""Value types of the client SDK and the protocol logic both clients share.

:class:`~vajra.client.AsyncClient` and :class:`~vajra.client.Client` only move frames and
keep time. What a request looks like (:func:`build_infer_request`, :func:`request_frames`),
which request a reply belongs to (:func:`decode_reply`) and what a reply means
(:func:`interpret_reply`) live here, once, so the two clients cannot drift apart.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from vajra.bus.codec import DecodeError, decode, encode
from vajra.bus.messages import (
    ErrorReply,
    InferRequest,
    InferResult,
    Message,
    StatsReply,
    StatsRequest,
    TokenChunk,
)
from vajra.errors import InvalidRequest, ProtocolError, VajraError, error_from_code

#: What a client hands to :func:`interpret_reply`: a decoded message, or the error that
#: stands in for one (a frame for this request that did not decode, or the client closing).
Reply = Message | VajraError

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


def build_stats_request(request_id: str | None = None) -> StatsRequest:
    return StatsRequest(request_id=request_id or new_request_id())


def request_frames(request: InferRequest | StatsRequest) -> list[bytes]:
    """Frames to send; the message id is the request id, so replies can name it either way."""
    return encode(request, message_id=request.request_id)


def reply_capacity(request: InferRequest | StatsRequest) -> int:
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
) -> InferenceResult | StreamChunk | dict[str, int] | None:
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
) -> InferenceResult | StreamChunk | dict[str, int] | None:
    if isinstance(reply, VajraError):
        raise reply
    if isinstance(reply, ErrorReply):
        raise error_from_code(reply.code, reply.message, reply.field)
    if isinstance(reply, InferResult):
        usage = Usage(
            prompt_tokens=reply.prompt_tokens,
            completion_tokens=reply.completion_tokens,
            total_tokens=reply.prompt_tokens + reply.completion_tokens,
            gpu_ms=reply.gpu_ms,
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
    raise ProtocolError(f"unexpected {reply.KIND!r} message in reply to a request", field="kind")


def expect(outcome: object, cls: type[T]) -> T:
    """``outcome`` as a ``cls``, or :class:`~vajra.errors.ProtocolError` for the wrong reply."""
    if not isinstance(outcome, cls):
        raise ProtocolError(
            f"expected a reply giving {cls.__name__}, got {type(outcome).__name__}",
            field="kind",
        )
    return outcome
