"""The paper's generation route: ``POST /v1/models/{model_id}/infer``."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from vajra.client import StreamChunk
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
    g = Generation(
        body.prompt,
        body.adapter_id,
        p.max_tokens,
        p.temperature,
        p.top_p,
        stop_list(p.stop),
        p.seed,
    )
    if not body.stream:
        r = await complete(ctx, key, g, ROUTE)
        return json_response(
            {
                "id": r.request_id,
                "model": base,
                "adapter_id": body.adapter_id,
                "text": r.text,
                "finish_reason": finish_reason(r.finish_reason),
                "usage": {**usage_body(r.usage), "gpu_ms": r.usage.gpu_ms},
            }
        )

    async def produce(emit: Emit) -> None:
        async def on_chunk(c: StreamChunk) -> None:
            event: dict[str, object] = {"id": c.request_id, "index": c.index, "text": c.text}
            if c.is_final and c.usage is not None:
                event["finish_reason"] = finish_reason(c.finish_reason)
                event["usage"] = {**usage_body(c.usage), "gpu_ms": c.usage.gpu_ms}
            else:
                event["finish_reason"] = None
            await emit(sse(event))

        await stream(ctx, key, g, ROUTE, on_chunk)
        await emit(DONE)

    return EventStream(produce, openai=False)
