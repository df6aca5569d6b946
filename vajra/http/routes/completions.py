"""OpenAI's generation routes: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

``model`` is the base model's name or one of the caller's adapters (``NAME`` or
``NAME@VERSION``). Chat messages become one prompt through the model's chat template.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from vajra.client import StreamChunk
from vajra.client._requests import new_request_id
from vajra.http._context import ApiKey, Ctx
from vajra.http._errors import ApiError
from vajra.http._generation import (
    Generation,
    complete,
    finish_reason,
    stop_list,
    stream,
    usage_body,
)
from vajra.http._responses import SSE_DOC, error_docs, json_response
from vajra.http._streams import DONE, Emit, EventStream, sse
from vajra.http.schemas.completions import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    OpenAISampling,
)
from vajra.http.schemas.errors import OpenAIErrorBody

router = APIRouter(tags=["openai"])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": SSE_DOC},
    **error_docs(OpenAIErrorBody, 400, 401, 404, 413, 429, 503, 504),
}


def _adapter_of(model: str, base: str) -> str | None:
    return None if model == base else model


def _sampling(body: OpenAISampling, max_tokens: int | None, default: int) -> dict[str, Any]:
    if body.n not in (None, 1):
        raise ApiError(400, "invalid_request", "only n=1 is supported", field="n")
    return {
        "max_tokens": max_tokens if max_tokens is not None else default,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "stop": stop_list(body.stop),
        "seed": body.seed,
    }


@router.post(
    "/v1/completions",
    summary="OpenAI text completion (`model`: the base model or ADAPTER[@VERSION])",
    response_model=Completion,
    responses=_RESPONSES,
)
async def completions(body: CompletionRequest, ctx: Ctx, key: ApiKey) -> Response:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "invalid_request", "send exactly one prompt", field="prompt")
    for name, bad in (
        ("echo", body.echo),
        ("logprobs", body.logprobs),
        ("suffix", body.suffix),
    ):
        if bad:
            raise ApiError(400, "invalid_request", f"{name} is not supported", field=name)
    adapter = _adapter_of(body.model, ctx.base_model)
    g = Generation(prompts[0], adapter, **_sampling(body, body.max_tokens, 16))
    route = "/v1/completions"
    rid, created = f"cmpl-{new_request_id()}", int(time.time())
    if not body.stream:
        r = await complete(ctx, key, g, route)
        choice = {"text": r.text, "index": 0, "logprobs": None}
        choice["finish_reason"] = finish_reason(r.finish_reason)
        return json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [choice],
                "usage": usage_body(r.usage),
            }
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, object]], **extra: object) -> bytes:
        head = {"id": rid, "object": "text_completion", "created": created}
        return sse({**head, "model": body.model, "choices": choices, **extra})

    async def produce(emit: Emit) -> None:
        async def on_chunk(c: StreamChunk) -> None:
            reason = finish_reason(c.finish_reason) if c.is_final else None
            if c.text or reason:
                choice = {"text": c.text, "index": 0, "logprobs": None}
                await emit(chunk([{**choice, "finish_reason": reason}]))

        final = await stream(ctx, key, g, route, on_chunk)
        if include_usage and final.usage is not None:
            await emit(chunk([], usage=usage_body(final.usage)))
        await emit(DONE)

    return EventStream(produce, openai=True)


def _chat_messages(body: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages with their content as one string (text parts joined)."""
    messages: list[dict[str, str]] = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(
                        400,
                        "invalid_request",
                        "only text content parts are supported",
                        field=f"messages.{i}.content",
                    )
                parts.append(str(part["text"]))
            content = "".join(parts)
        else:
            content = m.content or ""
        messages.append({"role": m.role, "content": content})
    return messages


@router.post(
    "/v1/chat/completions",
    summary="OpenAI chat completion, through the model's chat template",
    response_model=ChatCompletion,
    responses=_RESPONSES,
)
async def chat(body: ChatCompletionRequest, ctx: Ctx, key: ApiKey) -> Response:
    if body.logprobs:
        raise ApiError(400, "invalid_request", "logprobs is not supported", field="logprobs")
    prompt = ctx.chat.render(_chat_messages(body))
    max_tokens = body.max_completion_tokens or body.max_tokens
    adapter = _adapter_of(body.model, ctx.base_model)
    g = Generation(prompt, adapter, **_sampling(body, max_tokens, 64))
    route = "/v1/chat/completions"
    rid, created = f"chatcmpl-{new_request_id()}", int(time.time())
    if not body.stream:
        r = await complete(ctx, key, g, route)
        return json_response(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": r.text},
                        "finish_reason": finish_reason(r.finish_reason),
                        "logprobs": None,
                    }
                ],
                "usage": usage_body(r.usage),
            }
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, object]], **extra: object) -> bytes:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created}
        return sse({**head, "model": body.model, "choices": choices, **extra})

    async def produce(emit: Emit) -> None:
        first = True

        async def on_chunk(c: StreamChunk) -> None:
            nonlocal first
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            first = False
            if c.text:
                delta["content"] = c.text
            reason = finish_reason(c.finish_reason) if c.is_final else None
            if delta or reason:
                choice = {"index": 0, "delta": delta, "logprobs": None}
                await emit(chunk([{**choice, "finish_reason": reason}]))

        final = await stream(ctx, key, g, route, on_chunk)
        if include_usage and final.usage is not None:
            await emit(chunk([], usage=usage_body(final.usage)))
        await emit(DONE)

    return EventStream(produce, openai=True)
