"""The adapter routes: upload a PEFT adapter (``POST /v1/adapters``, or from memory:
``POST /v1/adapters/tensors``), list, list one name's versions, roll back, delete.

An upload is a multipart form: ``name`` plus the PEFT directory's two files, or one archive
of it (unpacked in a worker thread by :mod:`vajra.http._uploads`). The gateway validates the
adapter against the base model before storing anything.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated

import trio
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from starlette.responses import Response

from vajra.client import AdapterInfo
from vajra.http._context import QUERY_TIMEOUT_S, ApiKey, Ctx
from vajra.http._errors import ApiError
from vajra.http._generation import counting_limits
from vajra.http._responses import error_docs, json_response
from vajra.http._uploads import AdapterFiles, check_size, too_large, unpack_archive
from vajra.http.schemas.adapters import (
    ADAPTER_NAME_PATTERN,
    MAX_VERSION,
    AdapterDeleted,
    AdapterInfoBody,
    AdapterListBody,
    MergeBody,
    PushTensorsBody,
    RollbackBody,
)
from vajra.http.schemas.errors import ErrorBody

router = APIRouter(tags=["adapters"])

#: Multipart fields of ``POST /v1/adapters``: the PEFT directory's two files, or one archive.
CONFIG_FIELD = "adapter_config.json"
WEIGHTS_FIELD = "adapter_model.safetensors"
ARCHIVE_FIELD = "archive"
_UPLOAD_FIELDS = frozenset({"name", CONFIG_FIELD, WEIGHTS_FIELD, ARCHIVE_FIELD})
#: The upload route's path: its body limit is ``adapters.max_adapter_bytes`` plus the overhead.
UPLOAD_PATH = "/v1/adapters"
#: Pushes from memory: base64 of up to ``adapters.max_adapter_bytes`` plus the JSON around it.
TENSORS_PATH = "/v1/adapters/tensors"
#: Room for multipart framing (boundaries, part headers, the name) over the adapter's bytes.
UPLOAD_OVERHEAD_BYTES = 1 << 20


def adapter_body(a: AdapterInfo, parent: str) -> dict[str, object]:
    return {
        "name": a.name,
        "version": a.version,
        "ref": a.ref,
        "digest": a.digest,
        "size_bytes": a.size_bytes,
        "rank": a.rank,
        "lora_alpha": a.lora_alpha,
        "target_modules": list(a.target_modules),
        "active": a.active,
        "created_ms": a.created_ms,
        "parent": parent,
        "parent_version": a.parent_version,
        "dataset_digest": a.dataset_digest,
        "hyperparams": dict(a.hyperparams),
        "metrics": dict(a.metrics),
        "source": a.source,
        "staged": a.staged,
    }


async def _read_upload(upload: UploadFile, field: str, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise too_large(upload.size, max_bytes, f"the {field} part", field=field)
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(len(data), max_bytes, f"the {field} part", field=field)
    return data


async def _check_parts(request: Request) -> None:
    """Refuse pickled weights, parts this route does not take, and a part sent twice."""
    form = await request.form()
    for field in form:
        if field == "adapter_model.bin":
            raise ApiError(
                400,
                "invalid_request",
                "adapter_model.bin is a pickle; only safetensors is accepted: "
                "save with safe_serialization=True",
                field=field,
            )
        if field not in _UPLOAD_FIELDS:
            raise ApiError(
                400,
                "invalid_request",
                f"unexpected part {field!r}: send `name` with `{CONFIG_FIELD}` and "
                f"`{WEIGHTS_FIELD}`, or with one `{ARCHIVE_FIELD}`",
                field=field,
            )
        if len(form.getlist(field)) > 1:
            raise ApiError(400, "invalid_request", f"{field} sent twice", field=field)


@router.post(
    UPLOAD_PATH,
    status_code=201,
    summary="Upload a PEFT LoRA adapter as the next (active) version of `name`",
    description=(
        "Multipart form: `name`, plus either the PEFT directory's two files as parts named"
        f" `{CONFIG_FIELD}` and `{WEIGHTS_FIELD}`, or one part `{ARCHIVE_FIELD}` holding"
        " a .tar.gz (or .tar) or .zip of the directory (the two files at its top level or"
        " one folder down; other files such as README.md are skipped, links and paths"
        " leaving the archive are refused). Only safetensors weights are accepted. The"
        " gateway validates the adapter against the base model before storing anything:"
        " a refused adapter answers 400 naming the problem; one over"
        " `adapters.max_adapter_bytes` answers 413; one past the tenant's quota"
        " (`adapters.max_adapters_per_tenant` names, `max_versions_per_adapter` versions"
        " of a name) answers 403 `quota_exceeded`."
    ),
    response_model=AdapterInfoBody,
    responses=error_docs(ErrorBody, 400, 401, 403, 413, 429, 503, 504),
)
async def push_adapter(
    request: Request,
    ctx: Ctx,
    name: Annotated[
        str,
        Form(
            min_length=1,
            max_length=64,
            pattern=ADAPTER_NAME_PATTERN,
            description="The adapter's name; each upload adds a version",
        ),
    ],
    key: ApiKey,
    config_file: Annotated[
        UploadFile | None, File(alias=CONFIG_FIELD, description="adapter_config.json")
    ] = None,
    weights_file: Annotated[
        UploadFile | None,
        File(alias=WEIGHTS_FIELD, description="adapter_model.safetensors"),
    ] = None,
    archive: Annotated[
        UploadFile | None,
        File(alias=ARCHIVE_FIELD, description="A .tar.gz or .zip of the PEFT directory"),
    ] = None,
) -> Response:
    max_bytes = ctx.cfg.adapters.max_adapter_bytes
    await _check_parts(request)
    if archive is not None:
        if config_file is not None or weights_file is not None:
            raise ApiError(
                400,
                "invalid_request",
                f"send either `{ARCHIVE_FIELD}` or the two files, not both",
                field=ARCHIVE_FIELD,
            )
        data = await _read_upload(archive, ARCHIVE_FIELD, max_bytes)
        files = await trio.to_thread.run_sync(lambda: unpack_archive(data, max_bytes=max_bytes))
    else:
        for field, part in ((CONFIG_FIELD, config_file), (WEIGHTS_FIELD, weights_file)):
            if part is None:
                raise ApiError(
                    400,
                    "invalid_request",
                    f"{field} is missing: send `{CONFIG_FIELD}` and `{WEIGHTS_FIELD}`,"
                    f" or one `{ARCHIVE_FIELD}`",
                    field=field,
                )
        assert config_file is not None and weights_file is not None
        files = check_size(
            AdapterFiles(
                await _read_upload(config_file, CONFIG_FIELD, max_bytes),
                await _read_upload(weights_file, WEIGHTS_FIELD, max_bytes),
            ),
            max_bytes,
        )
    with counting_limits(ctx.metrics), ctx.pool.guard():
        info = await ctx.pool.client(key).push_adapter_bytes(
            files.config_json, files.weights, name, timeout_s=ctx.cfg.http.request_timeout_s
        )
    return json_response(adapter_body(info, ctx.base_model), 201)


@router.get(
    "/v1/adapters",
    summary="The caller's adapters, every version, by name then version",
    response_model=AdapterListBody,
    responses=error_docs(ErrorBody, 401, 503, 504),
)
async def list_adapters(ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        adapters = await ctx.pool.client(key).list_adapters(timeout_s=QUERY_TIMEOUT_S)
    data = [adapter_body(a, ctx.base_model) for a in adapters]
    return json_response({"object": "list", "data": data})


@router.delete(
    "/v1/adapters/{name}",
    summary="Delete an adapter: every version, or one (NAME@VERSION or ?version=)",
    description=(
        "Deleting the active version makes the newest remaining one active; deleting the"
        " last version deletes the name. Another tenant's adapter: 404, like a name that"
        " does not exist."
    ),
    response_model=AdapterDeleted,
    responses=error_docs(ErrorBody, 400, 401, 404, 503, 504),
)
async def delete_adapter(
    name: str,
    ctx: Ctx,
    key: ApiKey,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
) -> Response:
    with ctx.pool.guard():
        deleted = await ctx.pool.client(key).delete_adapter(
            name, version, timeout_s=QUERY_TIMEOUT_S
        )
    return json_response({"deleted": [adapter_body(a, ctx.base_model) for a in deleted]})


@router.post(
    TENSORS_PATH,
    status_code=201,
    summary="Push an adapter held in memory (a training loop outside Vajra) as the next version",
    description=(
        "JSON: `name`, `lora_config` (adapter_config.json as an object), `safetensors_base64`"
        " (the weights file, base64), optional `metrics`, `hyperparams`, `dataset_digest`"
        " recorded with the version, and `activate` (false: staged, reachable as"
        " NAME@VERSION only). Validated exactly as a directory upload, then swapped in warm:"
        " the executors holding the active version load the new one before the pointer"
        " flips (docs/hot-swap.md)."
    ),
    response_model=AdapterInfoBody,
    responses=error_docs(ErrorBody, 400, 401, 403, 413, 429, 503, 504),
)
async def push_adapter_tensors(body: PushTensorsBody, ctx: Ctx, key: ApiKey) -> Response:
    max_bytes = ctx.cfg.adapters.max_adapter_bytes
    if len(body.safetensors_base64) > (max_bytes + 2) // 3 * 4:
        raise too_large(len(body.safetensors_base64) * 3 // 4, max_bytes, "the weights")
    try:
        weights = base64.b64decode(body.safetensors_base64, validate=True)
        config_json = json.dumps({"peft_type": "LORA", **body.lora_config}).encode()
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ApiError(400, "invalid_request", f"bad body: {exc}", field="body") from None
    files = check_size(AdapterFiles(config_json, weights), max_bytes)
    with counting_limits(ctx.metrics), ctx.pool.guard():
        info = await ctx.pool.client(key).push_adapter_bytes(
            files.config_json,
            files.weights,
            body.name,
            timeout_s=ctx.cfg.http.request_timeout_s,
            metrics=body.metrics,
            hyperparams=body.hyperparams,
            dataset_digest=body.dataset_digest,
            activate=body.activate,
        )
    return json_response(adapter_body(info, ctx.base_model), 201)


@router.get(
    "/v1/adapters/{name}/versions",
    summary="Every version of one adapter, oldest first: digest, parent, created, metrics",
    response_model=AdapterListBody,
    responses=error_docs(ErrorBody, 400, 401, 404, 503, 504),
)
async def adapter_versions(name: str, ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        versions = await ctx.pool.client(key).versions(name, timeout_s=QUERY_TIMEOUT_S)
    data = [adapter_body(a, ctx.base_model) for a in versions]
    return json_response({"object": "list", "data": data})


@router.post(
    "/v1/adapters/{name}/rollback",
    summary="Make an earlier version active again, the warm way",
    description=(
        "The executors holding the active version load the target first, then the pointer"
        " flips; requests already running finish on their version. Another tenant's"
        " adapter, or a version that does not exist: 404."
    ),
    response_model=AdapterInfoBody,
    responses=error_docs(ErrorBody, 400, 401, 404, 503, 504),
)
async def rollback_adapter(name: str, body: RollbackBody, ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        info = await ctx.pool.client(key).rollback(
            name, body.version, timeout_s=ctx.cfg.http.request_timeout_s
        )
    return json_response(adapter_body(info, ctx.base_model))


@router.post(
    "/v1/adapters/{name}/merge",
    status_code=201,
    summary="Register the exact weighted sum of two versions as the next version",
    description=(
        "The merged version carries w1 times the first version's update plus w2 times the"
        " second's, exactly (rank r1 + r2, like PEFT's `cat` combination); both versions must"
        " target the same modules. It goes live the warm way unless `activate` is false."
        " Another tenant's adapter, or a version that does not exist: 404."
    ),
    response_model=AdapterInfoBody,
    responses=error_docs(ErrorBody, 400, 401, 404, 503, 504),
)
async def merge_adapter(name: str, body: MergeBody, ctx: Ctx, key: ApiKey) -> Response:
    with ctx.pool.guard():
        info = await ctx.pool.client(key).merge(
            name,
            (body.versions[0], body.versions[1]),
            (body.weights[0], body.weights[1]),
            activate=body.activate,
            timeout_s=ctx.cfg.http.request_timeout_s,
        )
    return json_response(adapter_body(info, ctx.base_model), 201)
