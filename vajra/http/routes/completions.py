"""OpenAI's text completion route, ``POST /v1/completions`` (chat: :mod:`.chat`).

``model`` is the base model's name or one of the caller's adapters (``NAME`` or
``NAME@VERSION``). Every decoding field maps as :mod:`vajra.http._decoding` says; besides:
``logprobs`` (0..20) gives each choice OpenAI's legacy ``logprobs`` (tokens, token_logprobs,
top_logprobs with the chosen token, text_offset); ``echo`` prepends the prompt to each choice
(and, with ``logprobs``, the prompt's tokens: ``prompt_logprobs`` is asked for too); ``n``
choices are sent together and their usage counts the prompt once. Streams send each choice's
chunks under its ``index``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from vajra.client import StreamChunk, TokenLogprob
from vajra.client._requests import new_request_id
from vajra.http._context import ApiKey, Ctx
from vajra.http._decoding import (
    echoed_legacy_logprobs,
    field_names,
    legacy_logprobs,
    sampling_of,
)
from vajra.http._errors import ApiError
from vajra.http._generation import Generation, complete, finish_reason, stream, usage_body
from vajra.http._responses import SSE_DOC, error_docs, json_response
from vajra.http._streams import DONE, Emit, EventStream, sse
from vajra.http.schemas.completions import Completion, CompletionRequest, OpenAISampling
from vajra.http.schemas.errors import OpenAIErrorBody
from vajra.policies.decoding import SamplingParams

router = APIRouter(tags=["openai"])

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": SSE_DOC},
    **error_docs(OpenAIErrorBody, 400, 401, 404, 413, 429, 503, 504),
}


def adapter_of(model: str, base: str) -> str | None:
    return None if model == base else model


def openai_params(
    body: OpenAISampling,
    max_tokens: int | None,
    default_max_tokens: int,
    *,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The decoding an OpenAI body asks for, with OpenAI's defaults (temperature 1)."""
    return sampling_of(
        body,
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop,
        seed=body.seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


class _Choices:
    """What a completion's choices send: the echoed prompt first, then the completion, with
    legacy ``logprobs`` (text offsets running on per choice) when asked for."""

    def __init__(self, prompt: str, *, echo: bool, logprobs: bool) -> None:
        self.prompt = prompt
        self.echo = echo
        self.logprobs = logprobs
        self._offsets: dict[int, int] = {}  # choice -> characters sent so far

    def text_and_logprobs(
        self,
        choice: int,
        text: str,
        entries: list[TokenLogprob],
        prompt_entries: list[TokenLogprob] | None,
    ) -> tuple[str, dict[str, list[Any]] | None]:
        first = choice not in self._offsets
        offset = self._offsets.get(choice, 0)
        lp: dict[str, list[Any]] | None = None
        if first and self.echo:
            if self.logprobs:
                lp = echoed_legacy_logprobs(self.prompt, prompt_entries or [], entries)
            text = self.prompt + text
        elif self.logprobs:
            lp = legacy_logprobs(entries, offset)
        self._offsets[choice] = offset + len(text)
        return text, lp


@router.post(
    "/v1/completions",
    summary="OpenAI text completion (`model`: the base model or ADAPTER[@VERSION])",
    response_model=Completion,
    responses=RESPONSES,
)
async def completions(body: CompletionRequest, ctx: Ctx, key: ApiKey) -> Response:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "invalid_request", "send exactly one prompt", field="prompt")
    if body.suffix:
        raise ApiError(400, "invalid_request", "suffix is not supported", field="suffix")
    n = body.n or 1
    if body.best_of is not None and body.best_of != n:
        raise ApiError(400, "invalid_request", "best_of must equal n", field="best_of")
    prompt, echo = prompts[0], bool(body.echo)
    params = openai_params(
        body,
        body.max_tokens,
        16,
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if echo else None,
    )
    adapter = adapter_of(body.model, ctx.base_model)
    g = Generation(prompt, adapter, params, n, field_names(body))
    route = "/v1/completions"
    rid, created = f"cmpl-{new_request_id()}", int(time.time())
    choices = _Choices(prompt, echo=echo, logprobs=body.logprobs is not None)
    if not body.stream:
        r = await complete(ctx, key, g, route)
        answer = []
        for c in r.choices:
            text, lp = choices.text_and_logprobs(c.index, c.text, c.logprobs, r.prompt_logprobs)
            reason = finish_reason(c.finish_reason)
            answer.append({"text": text, "index": c.index, "logprobs": lp, "finish_reason": reason})
        return json_response(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": answer,
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
            text, lp = choices.text_and_logprobs(c.choice, c.text, c.logprobs, c.prompt_logprobs)
            if text or reason or (lp and lp["tokens"]):
                choice = {"text": text, "index": c.choice, "logprobs": lp}
                await emit(chunk([{**choice, "finish_reason": reason}]))

        usage = await stream(ctx, key, g, route, on_chunk)
        if include_usage:
            await emit(chunk([], usage=usage_body(usage)))
        await emit(DONE)

    return EventStream(produce, openai=True)
