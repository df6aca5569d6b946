"""``n`` choices from one call, and results gathered from streams: pure helpers both clients use.

A call for ``n > 1`` choices sends ``n`` requests at once (:func:`fan_out`): ids
``<id>-0 .. <id>-<n-1>`` derived from one, seeds ``seed + i`` when seeded, the same prompt
and adapter, so they reach the cluster together and an engine can share the prompt's KV
cache between them. Their answers become one :class:`~vajra.client.InferenceResult`
(:func:`merge`): choice 0's fields, every choice in ``choices``, and the usage summed with the
prompt counted once.

A result that asked for log-probabilities is read as a stream and gathered (:func:`gather`):
its log-probabilities then travel a step's worth per message, however many were asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from vajra.bus.messages import InferRequest
from vajra.client._types import Choice, InferenceResult, StreamChunk, Usage
from vajra.errors import ProtocolError
from vajra.policies.decoding import SEED_MAX, SamplingParams


def read_as_stream(params: SamplingParams) -> bool:
    """Whether a whole result is better read as a stream: it asked for log-probabilities."""
    return params.logprobs is not None or params.prompt_logprobs is not None


def fan_out(request: InferRequest, n: int) -> list[InferRequest]:
    """The ``n`` requests of one call (``request`` itself when ``n == 1``)."""
    if n == 1:
        return [request]
    seed = request.sampling.seed
    out = []
    for i in range(n):
        sampling = request.sampling
        if seed is not None:
            sampling = msgspec.structs.replace(sampling, seed=(seed + i) & SEED_MAX)
        rid = f"{request.request_id}-{i}"
        out.append(msgspec.structs.replace(request, request_id=rid, sampling=sampling))
    return out


def base_request_id(requests: Sequence[InferRequest]) -> str:
    """The id the caller sees for a call's requests (the one they were derived from)."""
    rid = requests[0].request_id
    return rid if len(requests) == 1 else rid.rsplit("-", 1)[0]


def gather(chunks: Sequence[StreamChunk]) -> InferenceResult:
    """One stream's chunks, up to and including its final one, as a whole result."""
    if not chunks or chunks[-1].usage is None or chunks[-1].finish_reason is None:
        raise ProtocolError("the stream ended without its final chunk", field="kind")
    final = chunks[-1]
    assert final.usage is not None and final.finish_reason is not None
    prompt_logprobs = next(
        (c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None
    )
    return InferenceResult(
        request_id=final.request_id,
        text="".join(c.text for c in chunks),
        tokens=[t for c in chunks for t in c.token_ids],
        finish_reason=final.finish_reason,
        usage=final.usage,
        executor_id=final.executor_id,
        logprobs=[lp for c in chunks for lp in c.logprobs],
        prompt_logprobs=prompt_logprobs,
    )


def merge(results: Sequence[InferenceResult], request_id: str) -> InferenceResult:
    """The results of a call's ``n`` requests, in choice order, as one result."""
    if len(results) == 1:
        return results[0]
    first = results[0]
    completion = sum(r.usage.completion_tokens for r in results)
    usage = Usage(
        prompt_tokens=first.usage.prompt_tokens,
        completion_tokens=completion,
        total_tokens=first.usage.prompt_tokens + completion,
        gpu_ms=sum(r.usage.gpu_ms for r in results),
        queue_ms=max(r.usage.queue_ms for r in results),
    )
    choices = tuple(
        Choice(i, r.request_id, r.text, r.tokens, r.finish_reason, r.usage, r.logprobs)
        for i, r in enumerate(results)
    )
    return InferenceResult(
        request_id=request_id,
        text=first.text,
        tokens=first.tokens,
        finish_reason=first.finish_reason,
        usage=usage,
        executor_id=first.executor_id,
        logprobs=first.logprobs,
        prompt_logprobs=first.prompt_logprobs,
        fanout=choices,
    )
