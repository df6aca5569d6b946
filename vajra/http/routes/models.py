"""The model routes: OpenAI's ``GET /v1/models`` and ``GET /v1/models/{model_id}``, and the
paper's ``GET /v1/models/{model_id}/versions``.

The caller's models are the base model and, per adapter name, ``NAME`` (its active version)
then one ``NAME@VERSION`` per version. Listing authenticates the key at the gateway
(uncached: a revoked key fails at once).
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from vajra.client import AdapterInfo
from vajra.http._context import QUERY_TIMEOUT_S, ApiKey, BridgeContext, Ctx
from vajra.http._errors import ApiError
from vajra.http._responses import error_docs, json_response
from vajra.http.schemas.errors import ErrorBody, OpenAIErrorBody
from vajra.http.schemas.models import ModelCard, ModelList, ModelVersions

router = APIRouter()


def _model_card(model_id: str, parent: str | None = None) -> dict[str, object]:
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "vajra",
        "parent": parent,
    }


def model_cards(adapters: list[AdapterInfo], base: str) -> list[dict[str, object]]:
    """The base model, then per adapter name: NAME (its active version), NAME@V per version.

    ``adapters`` come from the gateway by name then version.
    """
    active = {a.name: a for a in adapters if a.active}
    cards = [_model_card(base)]
    listed: set[str] = set()
    for a in adapters:
        if a.name not in listed and a.name in active:
            current = active[a.name]
            cards.append({**_model_card(a.name, base), "created": current.created_ms // 1000})
        listed.add(a.name)
        cards.append({**_model_card(a.ref, base), "created": a.created_ms // 1000})
    return cards


async def _cards(ctx: BridgeContext, key: str) -> list[dict[str, object]]:
    with ctx.pool.guard():
        adapters = await ctx.pool.client(key).list_adapters(timeout_s=QUERY_TIMEOUT_S)
    return model_cards(adapters, ctx.base_model)


def _split_ref(model_id: str) -> tuple[str, int | None]:
    """``NAME`` -> (NAME, None), ``NAME@7`` -> (NAME, 7); anything else -> (model_id, -1)."""
    name, at, v = model_id.partition("@")
    if not at:
        return name, None
    return (name, int(v)) if v.isascii() and v.isdigit() and len(v) < 20 else (model_id, -1)


def matching(adapters: list[AdapterInfo], model_id: str) -> list[AdapterInfo]:
    """The caller's versions that ``model_id`` (NAME: all of them, NAME@V: that one) names."""
    name, version = _split_ref(model_id)
    return [a for a in adapters if a.name == name and version in (None, a.version)]


@router.get(
    "/v1/models",
    tags=["openai"],
    summary="The base model and the caller's adapters (NAME and every NAME@VERSION)",
    description=(
        "The base model (`parent` null), then for each of the caller's adapters one entry"
        " `NAME` (its active version) followed by one `NAME@VERSION` per version, each with"
        " `parent` = the base model. Any of these ids works as `model`."
    ),
    response_model=ModelList,
    responses=error_docs(OpenAIErrorBody, 401, 503, 504),
)
async def models(ctx: Ctx, key: ApiKey) -> Response:
    return json_response({"object": "list", "data": await _cards(ctx, key)})


@router.get(
    "/v1/models/{model_id}",
    tags=["openai"],
    summary="One model the caller can use: the base, NAME or NAME@VERSION",
    response_model=ModelCard,
    responses=error_docs(OpenAIErrorBody, 401, 404, 503, 504),
)
async def model(model_id: str, ctx: Ctx, key: ApiKey) -> Response:
    for card in await _cards(ctx, key):
        if card["id"] == model_id:
            return json_response(card)
    raise ApiError(404, "not_found", f"no model {model_id!r}", field="model")


@router.get(
    "/v1/models/{model_id}/versions",
    tags=["paper"],
    summary="Versions of the base model (one) or of one of the caller's adapters",
    description=(
        "`model_id` is the base model's name, an adapter NAME (all its versions) or"
        " NAME@VERSION (that one). Another tenant's adapter: 404, like a name that does"
        " not exist."
    ),
    response_model=ModelVersions,
    responses=error_docs(ErrorBody, 401, 404, 503, 504),
)
async def versions(model_id: str, ctx: Ctx, key: ApiKey) -> Response:
    base = ctx.base_model
    with ctx.pool.guard():
        adapters = await ctx.pool.client(key).list_adapters(timeout_s=QUERY_TIMEOUT_S)
    if model_id == base:
        one = {
            "version": 1,
            "ref": base,
            "active": True,
            "digest": None,
            "size_bytes": None,
            "rank": None,
            "created_ms": None,
        }
        return json_response({"model_id": base, "parent": None, "versions": [one]})
    found = matching(adapters, model_id)
    if not found:
        raise ApiError(404, "not_found", f"adapter {model_id!r} not found", field="model_id")
    return json_response(
        {
            "model_id": model_id,
            "parent": base,
            "versions": [
                {
                    "version": a.version,
                    "ref": a.ref,
                    "active": a.active,
                    "digest": a.digest,
                    "size_bytes": a.size_bytes,
                    "rank": a.rank,
                    "created_ms": a.created_ms,
                }
                for a in found
            ],
        }
    )
