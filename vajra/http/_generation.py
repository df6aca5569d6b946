"""One generation call through the gateway, whichever route it came from, with its metrics.

Every generation route builds a :class:`Generation` and hands it to :func:`complete` or
:func:`stream`, which call the SDK with the caller's key and the bridge's deadline
(``http.request_timeout_s``), count the gateway's per-tenant refusals and observe the
generation's latency and usage in :class:`~vajra.http.BridgeMetrics`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from vajra.client import InferenceResult, StreamChunk, Usage
from vajra.errors import RateLimited
from vajra.http._context import BridgeContext
from vajra.http._errors import ApiError
from vajra.http._metrics import BridgeMetrics


@dataclass(frozen=True, slots=True)
class Generation:
    """One generation call, whichever route it came from."""

    prompt: str
    adapter: str | None
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None


def stop_list(stop: str | list[str] | None) -> list[str]:
    """``stop`` as the API takes it (one string, a list or nothing) as a list."""
    return [stop] if isinstance(stop, str) else list(stop or [])


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


async def complete(
    ctx: BridgeContext, api_key: str, gen: Generation, route: str
) -> InferenceResult:
    t0 = trio.current_time()
    with counting_limits(ctx.metrics), ctx.pool.guard():
        result = await ctx.pool.client(api_key).infer(
            gen.prompt,
            adapter=gen.adapter,
            max_tokens=gen.max_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            stop=gen.stop,
            seed=gen.seed,
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
) -> StreamChunk:
    """Stream ``gen``, handing each chunk to ``on_chunk``; returns the final chunk."""
    t0 = trio.current_time()
    ttft: float | None = None
    final: StreamChunk | None = None
    with counting_limits(ctx.metrics), ctx.pool.guard():
        chunks_of = ctx.pool.client(api_key).stream(
            gen.prompt,
            adapter=gen.adapter,
            max_tokens=gen.max_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            stop=gen.stop,
            seed=gen.seed,
            timeout_s=ctx.cfg.http.request_timeout_s,
        )
        async with chunks_of as chunks:  # leaving early (a disconnect) cancels it
            async for chunk in chunks:
                if ttft is None:
                    ttft = trio.current_time() - t0
                if chunk.is_final:
                    final = chunk
                await on_chunk(chunk)
    if final is None or final.usage is None:
        raise ApiError(502, "malformed_frame", "the stream ended without a final chunk")
    ctx.metrics.observe_generation(
        route,
        adapter=gen.adapter is not None,
        usage=final.usage,
        e2e_s=trio.current_time() - t0,
        ttft_s=ttft,
    )
    return final
