"""One generation call through the gateway, whichever route it came from, with its metrics.

Every generation route builds a :class:`Generation` and hands it to :func:`complete` or
:func:`stream`, which call the SDK with the caller's key and the bridge's deadline
(``http.request_timeout_s``), count the gateway's per-tenant refusals and observe the
generation's latency and usage in :class:`~vajra.http.BridgeMetrics`. A generation of ``n``
choices is one SDK call (its ``n`` requests are sent together); its usage counts the
prompt once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from vajra.client import InferenceResult, SamplingParams, StreamChunk, Usage
from vajra.errors import InvalidRequest, RateLimited
from vajra.http._context import BridgeContext
from vajra.http._errors import ApiError
from vajra.http._metrics import BridgeMetrics


@dataclass(frozen=True, slots=True)
class Generation:
    """One generation call, whichever route it came from."""

    prompt: str
    adapter: str | None
    params: SamplingParams
    n: int = 1
    #: The route's own names for fields an error may name (``field_names``); the engine
    #: says ``response_format`` for a bad grammar whichever field gave it.
    renames: Mapping[str, str] = field(default_factory=dict)


def usage_body(u: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def finish_reason(reason: str | None) -> str:
    """``stop`` or ``length``, the two reasons the APIs document."""
    return reason if reason in ("stop", "length") else "stop"


@contextmanager
def counting_limits(metrics: BridgeMetrics) -> Iterator[None]:
    """Count the gateway's per-tenant refusals (raised on as they are: 429)."""
    try:
        yield
    except RateLimited as exc:
        metrics.limited.labels(exc.code.value).inc()
        raise


@contextmanager
def _renaming(renames: Mapping[str, str]) -> Iterator[None]:
    """An InvalidRequest naming a field the route calls otherwise, under the route's name."""
    try:
        yield
    except InvalidRequest as exc:
        if exc.field is None or exc.field not in renames:
            raise
        raise InvalidRequest(exc.message, field=renames[exc.field]) from None


async def complete(
    ctx: BridgeContext, api_key: str, gen: Generation, route: str
) -> InferenceResult:
    t0 = trio.current_time()
    with counting_limits(ctx.metrics), ctx.pool.guard(), _renaming(gen.renames):
        result = await ctx.pool.client(api_key).infer(
            gen.prompt,
            adapter=gen.adapter,
            params=gen.params,
            n=gen.n,
            timeout_s=ctx.cfg.http.request_timeout_s,
        )
    ctx.metrics.observe_generation(
        route,
        adapter=gen.adapter is not None,
        usage=result.usage,
        e2e_s=trio.current_time() - t0,
        ttft_s=None,
    )
    return result


async def stream(
    ctx: BridgeContext,
    api_key: str,
    gen: Generation,
    route: str,
    on_chunk: Callable[[StreamChunk], Awaitable[None]],
) -> Usage:
    """Stream ``gen``, handing each chunk (every choice's) to ``on_chunk``; returns the usage
    of all its choices, the prompt counted once."""
    t0 = trio.current_time()
    ttft: float | None = None
    finals: list[Usage] = []
    with counting_limits(ctx.metrics), ctx.pool.guard(), _renaming(gen.renames):
        chunks_of = ctx.pool.client(api_key).stream(
            gen.prompt,
            adapter=gen.adapter,
            params=gen.params,
            n=gen.n,
            timeout_s=ctx.cfg.http.request_timeout_s,
        )
        async with chunks_of as chunks:  # leaving early (a disconnect) cancels it
            async for chunk in chunks:
                if ttft is None:
                    ttft = trio.current_time() - t0
                if chunk.is_final and chunk.usage is not None:
                    finals.append(chunk.usage)
                await on_chunk(chunk)
    if len(finals) != gen.n:
        raise ApiError(502, "malformed_frame", "the stream ended without a final chunk")
    usage = total_usage(finals)
    ctx.metrics.observe_generation(
        route,
        adapter=gen.adapter is not None,
        usage=usage,
        e2e_s=trio.current_time() - t0,
        ttft_s=ttft,
    )
    return usage


def total_usage(usages: list[Usage]) -> Usage:
    """The usage of a generation's choices together: the prompt once, the rest summed."""
    if len(usages) == 1:
        return usages[0]
    prompt = usages[0].prompt_tokens
    completion = sum(u.completion_tokens for u in usages)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        gpu_ms=sum(u.gpu_ms for u in usages),
        queue_ms=max(u.queue_ms for u in usages),
    )
