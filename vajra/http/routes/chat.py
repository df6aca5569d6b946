"""OpenAI's chat route, ``POST /v1/chat/completions``.

Chat messages become one prompt through the model's chat template; ``model`` is as for
``/v1/completions``. Every decoding field maps as :mod:`vajra.http._decoding` says; besides:
``logprobs`` (true) gives each choice's tokens their logprobs, with ``top_logprobs``
(0..20, only with ``logprobs``) alternatives each; ``response_format`` ``json_object`` or
``json_schema`` constrains the output; ``n`` choices are sent together (usage counts the
prompt once); streams send each choice's deltas under its ``index``.
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from starlette.responses import Response

from vajra.client import StreamChunk
from vajra.client._requests import new_request_id
from vajra.http._context import ApiKey, Ctx
from vajra.http._decoding import chat_logprobs, field_names
from vajra.http._errors import ApiError
from vajra.http._generation import Generation, complete, finish_reason, stream, usage_body
from vajra.http._responses import json_response
from vajra.http._streams import DONE, Emit, EventStream, sse
from vajra.http.routes.completions import RESPONSES, adapter_of, openai_params
from vajra.http.schemas.completions import ChatCompletion, ChatCompletionRequest

router = APIRouter(tags=["openai"])


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


def _top_logprobs(body: ChatCompletionRequest) -> int | None:
    """How many alternatives per token the engine is asked for (None: no logprobs)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(
            400, "invalid_request", "top_logprobs needs logprobs: true", field="top_logprobs"
        )
    return (body.top_logprobs or 0) if body.logprobs else None


@router.post(
    "/v1/chat/completions",
    summary="OpenAI chat completion, through the model's chat template",
    response_model=ChatCompletion,
    responses=RESPONSES,
)
async def chat(body: ChatCompletionRequest, ctx: Ctx, key: ApiKey) -> Response:
    top = _top_logprobs(body)
    prompt = ctx.chat.render(_chat_messages(body))
    max_tokens = body.max_completion_tokens or body.max_tokens
    params = openai_params(body, max_tokens, 64, logprobs=top)
    adapter = adapter_of(body.model, ctx.base_model)
    renames = field_names(body, logprobs="top_logprobs")
    g = Generation(prompt, adapter, params, body.n or 1, renames)
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
                        "index": c.index,
                        "message": {"role": "assistant", "content": c.text},
                        "finish_reason": finish_reason(c.finish_reason),
                        "logprobs": None if top is None else chat_logprobs(c.logprobs, top),
                    }
                    for c in r.choices
                ],
                "usage": usage_body(r.usage),
            }
        )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, object]], **extra: object) -> bytes:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created}
        return sse({**head, "model": body.model, "choices": choices, **extra})

    async def produce(emit: Emit) -> None:
        started: set[int] = set()

        async def on_chunk(c: StreamChunk) -> None:
            delta: dict[str, str] = {}
            if c.choice not in started:
                started.add(c.choice)
                delta["role"] = "assistant"
            if c.text:
                delta["content"] = c.text
            reason = finish_reason(c.finish_reason) if c.is_final else None
            lp = None if top is None or not c.logprobs else chat_logprobs(c.logprobs, top)
            if delta or reason or lp:
                choice = {"index": c.choice, "delta": delta, "logprobs": lp}
                await emit(chunk([{**choice, "finish_reason": reason}]))

        usage = await stream(ctx, key, g, route, on_chunk)
        if include_usage:
            await emit(chunk([], usage=usage_body(usage)))
        await emit(DONE)

    return EventStream(produce, openai=True)
