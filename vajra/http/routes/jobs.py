"""The training-job routes: ``POST /v1/models/{model_id}/train`` (``model_id``: the adapter to
train), ``GET /v1/jobs``, ``GET`` / ``DELETE /v1/jobs/{job_id}`` (``DELETE`` cancels) and
``GET /v1/jobs/{job_id}/events``: server-sent events, one per change of the job, until it is
finished (the last event holds its final state, then ``data: [DONE]``). The gateway checks a
submission before anything is queued; its refusals keep their status (400 naming the field,
404 for an unknown or another tenant's adapter or job, 403 over a quota, 413 over the size).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Query
from starlette.responses import Response

from vajra.client import JobInfo
from vajra.config import VajraConfig
from vajra.http._context import QUERY_TIMEOUT_S, ApiKey, Ctx
from vajra.http._errors import ApiError
from vajra.http._responses import error_docs, json_response
from vajra.http._streams import DONE, Emit, EventStream, sse
from vajra.http.schemas.errors import ErrorBody
from vajra.http.schemas.jobs import JobBody, JobListBody, TrainBody

router = APIRouter(tags=["training"])

TRAIN_ROUTE = "/v1/models/{model_id}/train"
#: The train route's paths, for the body limit (the middleware sees paths, not routes).
TRAIN_PATH_PATTERN = r"/v1/models/[^/]+/train"
#: Room in a train body for its other fields.
TRAIN_BODY_OVERHEAD_BYTES = 65_536


def train_body_limit(cfg: VajraConfig) -> int:
    """The most a train body may hold: a dataset of ``training.max_dataset_bytes`` as base64
    (4/3 of it) or as JSON text (twice it allows every line's quotes and newline escaped),
    plus the other fields. The gateway then checks the dataset's own size."""
    return 2 * cfg.training.max_dataset_bytes + TRAIN_BODY_OVERHEAD_BYTES


def job_body(j: JobInfo) -> dict[str, Any]:
    return {
        "object": "training.job",
        "id": j.job_id,
        "adapter": j.adapter,
        "status": j.status,
        "base_model": j.base_model,
        "from_version": j.from_version,
        "params": dict(j.params),
        "dataset_digest": j.dataset_digest,
        "created_ms": j.created_ms,
        "started_ms": j.started_ms,
        "finished_ms": j.finished_ms,
        "step": j.step,
        "total_steps": j.total_steps,
        "epoch": j.epoch,
        "loss": j.loss,
        "tokens": j.tokens,
        "gradients": j.gradients,
        "cost_usd": j.cost_usd,
        "checkpoint_step": j.checkpoint_step,
        "result_version": j.result_version,
        "error": j.error,
        "attempt": j.attempt,
        "cancel_requested": j.cancel_requested,
    }


def _dataset(body: TrainBody) -> str | bytes:
    given = [x is not None for x in (body.dataset, body.dataset_base64, body.dataset_uri)]
    if sum(given) != 1:
        raise ApiError(
            400,
            "invalid_request",
            "give exactly one of dataset, dataset_base64 or dataset_uri",
            field="dataset",
        )
    if body.dataset is not None:
        try:
            return body.dataset.encode()
        except UnicodeEncodeError:
            raise ApiError(
                400, "invalid_request", "dataset must be valid UTF-8", field="dataset"
            ) from None
    if body.dataset_base64 is not None:
        try:
            return base64.b64decode(body.dataset_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(
                400, "invalid_request", "dataset_base64 is not base64", field="dataset_base64"
            ) from None
    assert body.dataset_uri is not None
    if not body.dataset_uri.startswith("s3://"):
        raise ApiError(400, "invalid_request", "dataset_uri must be s3://...", field="dataset_uri")
    return body.dataset_uri


@router.post(
    TRAIN_ROUTE,
    status_code=201,
    summary="Queue a fine-tuning job of the caller's adapter `model_id`",
    response_model=JobBody,
    responses=error_docs(ErrorBody, 400, 401, 403, 404, 413, 429, 503, 504),
)
async def train(model_id: str, body: TrainBody, ctx: Ctx, key: ApiKey) -> Response:
    dataset = _dataset(body)
    p = body.params
    named = ("epochs", "learning_rate", "batch_size", "max_steps", "rank", "alpha", "seed")
    for name in named:
        if name in p and getattr(body, name) is not None:
            raise ApiError(400, "invalid_request", f"{name} given twice", field=name)
    params: dict[str, Any] = {k: v for k, v in p.items() if k not in named}
    with ctx.pool.guard():
        job = await ctx.pool.client(key).train(
            model_id,
            dataset,
            epochs=body.epochs if body.epochs is not None else p.get("epochs"),
            learning_rate=body.learning_rate
            if body.learning_rate is not None
            else p.get("learning_rate"),
            batch_size=body.batch_size if body.batch_size is not None else p.get("batch_size"),
            max_steps=body.max_steps if body.max_steps is not None else p.get("max_steps"),
            rank=body.rank if body.rank is not None else p.get("rank"),
            alpha=body.alpha if body.alpha is not None else p.get("alpha"),
            target_modules=body.target_modules,
            seed=body.seed if body.seed is not None else p.get("seed"),
            from_version=body.from_version,
            fresh=body.fresh,
            max_dataset_bytes=ctx.cfg.training.max_dataset_bytes,
            timeout_s=ctx.cfg.http.request_timeout_s,
            **{k: v for k, v in params.items() if k != "target_modules"},
        )
    assert job.last is not None
    return json_response(job_body(job.last), 201)


@router.get(
    "/v1/jobs",
    summary="The caller's training jobs, newest first",
    response_model=JobListBody,
    responses=error_docs(ErrorBody, 400, 401, 503, 504),
)
async def list_jobs(
    ctx: Ctx, key: ApiKey, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> Response:
    with ctx.pool.guard():
        infos = await ctx.pool.client(key).jobs(limit=limit, timeout_s=QUERY_TIMEOUT_S)
    return json_response({"object": "list", "data": [job_body(j) for j in infos]})


@router.get(
    "/v1/jobs/{job_id}",
    summary="One of the caller's training jobs",
    response_model=JobBody,
    responses=error_docs(ErrorBody, 401, 404, 503, 504),
)
async def get_job(job_id: str, ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        info = await ctx.pool.client(key).job(job_id).status(timeout_s=QUERY_TIMEOUT_S)
    return json_response(job_body(info))


@router.delete(
    "/v1/jobs/{job_id}",
    summary="Cancel a training job (a queued one at once, a running one at its next step)",
    response_model=JobBody,
    responses=error_docs(ErrorBody, 401, 404, 503, 504),
)
async def cancel_job(job_id: str, ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        info = await ctx.pool.client(key).job(job_id).cancel(timeout_s=QUERY_TIMEOUT_S)
    return json_response(job_body(info))


@router.get(
    "/v1/jobs/{job_id}/events",
    summary="Server-sent events of a job's progress until it is finished",
    responses={
        200: {"content": {"text/event-stream": {}}},
        **error_docs(ErrorBody, 401, 404, 503),
    },
)
async def job_events(job_id: str, ctx: Ctx, key: ApiKey) -> Response:
    client = ctx.pool.client(key)

    async def produce(emit: Emit) -> None:
        with ctx.pool.guard():
            async with client.job(job_id).follow() as progress:
                async for info in progress:
                    await emit(sse(job_body(info)))
        await emit(DONE)

    return EventStream(produce, openai=False)
