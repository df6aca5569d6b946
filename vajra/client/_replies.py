"""What a reply means: which request it answers, and the value or error it stands for.

:func:`decode_reply` names the request a reply belongs to; :func:`interpret_reply` turns it
into what the SDK hands back (or raises the error it stands for); :func:`expect` and the
adapter helpers check that a call's final answer is of the kind the call asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from vajra.bus.codec import DecodeError, decode
from vajra.bus.messages import (
    AdapterReply,
    AdminReply,
    ClusterStatusReply,
    ErrorReply,
    InferResult,
    Message,
    PongReply,
    StatsReply,
    TenantInfo,
    TokenChunk,
    UsageReply,
)
from vajra.client._types import AdapterInfo, InferenceResult, StreamChunk, Usage
from vajra.errors import ProtocolError, VajraError, error_from_code

#: What a client hands to :func:`interpret_reply`: a decoded message, or the error that
#: stands in for one (a frame for this request that did not decode, or the client closing).
Reply = Message | VajraError

#: Replies handed back as they are, for the client method to turn into its public value.
_PLAIN_REPLIES = (TenantInfo, UsageReply, AdminReply, ClusterStatusReply, AdapterReply, PongReply)

T = TypeVar("T")


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
                logprobs=reply.logprobs,
                prompt_logprobs=reply.prompt_logprobs,
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
            logprobs=reply.logprobs,  # for streams: what no chunk carried
            prompt_logprobs=reply.prompt_logprobs,
            executor_id=reply.executor_id,
        )
    if isinstance(reply, TokenChunk):
        if stream is None:
            return None
        stream.parts.append(reply.text)
        stream.chars += len(reply.text)
        stream.tokens += len(reply.token_ids)
        stream.next_index = max(stream.next_index, reply.index + 1)
        return StreamChunk(
            reply.request_id,
            reply.index,
            reply.text,
            reply.token_ids,
            logprobs=reply.logprobs,
            prompt_logprobs=reply.prompt_logprobs,
        )
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
            parent_version=a.parent_version,
            dataset_digest=a.dataset_digest,
            hyperparams=dict(a.hyperparams),
            metrics=dict(a.metrics),
            source=a.source,
            staged=a.staged,
        )
        for a in reply.adapters
    ]


def single_adapter(outcome: object) -> AdapterInfo:
    infos = adapter_infos(outcome)
    if len(infos) != 1:
        raise ProtocolError(f"expected one adapter in the reply, got {len(infos)}", field="kind")
    return infos[0]
