"""The paper's generation route: ``POST /v1/models/{model_id}/infer``.

``parameters`` takes every decoding field (:class:`~vajra.http.schemas.infer.InferParameters`,
mapped by :mod:`vajra.http._decoding`), ``n`` choices included. The answer is choice 0's
``text``, ``finish_reason`` and ``logprobs``, every choice in ``choices``, the prompt's
``prompt_logprobs`` when asked, and the usage of them all (the prompt counted once). Streamed
events carry their ``choice``; each choice's last event has its ``finish_reason`` and usage.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from vajra.client import StreamChunk
from vajra.http._context import ApiKey, Ctx
from vajra.http._decoding import field_names, native_logprobs, sampling_of
from vajra.http._errors import ApiError
from vajra.http._generation import Generation, complete, finish_reason, stream, usage_body
from vajra.http._responses import SSE_DOC, error_docs, json_response
from vajra.http._streams import DONE, Emit, EventStream, sse
from vajra.http.schemas.errors import ErrorBody
from vajra.http.schemas.infer import InferBody, InferResponse

router = APIRouter(tags=["paper"])

ROUTE = "/v1/models/{model_id}/infer"


@router.post(
    ROUTE,
    summary="Generate with the base model or one of the caller's adapters",
    response_model=InferResponse,
    responses={
        200: {"content": SSE_DOC},
        **error_docs(ErrorBody, 400, 401, 404, 413, 429, 503, 504),
    },
)
async def infer(model_id: str, body: InferBody, ctx: Ctx, key: ApiKey) -> Response:
    base = ctx.base_model
    if model_id != base:
        raise ApiError(404, "model_not_found", f"no model {model_id!r}", field="model_id")
    p = body.parameters
    params = sampling_of(
        p,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        stop=p.stop,
        seed=p.seed,
        logprobs=p.logprobs,
        prompt_logprobs=p.prompt_logprobs,
    )
    g = Generation(body.prompt, body.adapter_id, params, p.n or 1, field_names(p))
    want_logprobs = params.logprobs is not None
    if not body.stream:
        r = await complete(ctx, key, g, ROUTE)
        choices = [
            {
                "index": c.index,
                "text": c.text,
                "finish_reason": finish_reason(c.finish_reason),
                "logprobs": native_logprobs(c.logprobs) if want_logprobs else None,
            }
            for c in r.choices
        ]
        return json_response(
            {
                "id": r.request_id,
                "model": base,
                "adapter_id": body.adapter_id,
                "text": r.text,
                "finish_reason": finish_reason(r.finish_reason),
                "usage": {**usage_body(r.usage), "gpu_ms": r.usage.gpu_ms},
                "logprobs": choices[0]["logprobs"],
                "prompt_logprobs": native_logprobs(r.prompt_logprobs),
                "choices": choices,
            }
        )

    async def produce(emit: Emit) -> None:
        async def on_chunk(c: StreamChunk) -> None:
            event: dict[str, Any] = {
                "id": c.request_id,
                "index": c.index,
                "choice": c.choice,
                "text": c.text,
            }
            if want_logprobs:
                event["logprobs"] = native_logprobs(c.logprobs)
            if c.prompt_logprobs is not None:
                event["prompt_logprobs"] = native_logprobs(c.prompt_logprobs)
            if c.is_final and c.usage is not None:
                event["finish_reason"] = finish_reason(c.finish_reason)
                event["usage"] = {**usage_body(c.usage), "gpu_ms": c.usage.gpu_ms}
            else:
                event["finish_reason"] = None
            await emit(sse(event))

        await stream(ctx, key, g, ROUTE, on_chunk)
        await emit(DONE)

    return EventStream(produce, openai=False)
