"""The ASGI application: routes, error handlers and middleware of the HTTP bridge.

Every route is a thin translation: HTTP in, one SDK call through :class:`GatewayPool` out.
Authentication and per-tenant rate and concurrency limits are the gateway's (each request
carries the caller's key; a refusal becomes 429 with ``Retry-After``); the bridge adds body
size and time limits, a deadline per request (``http.request_timeout_s``, sent to the gateway
as the request's deadline), metrics and the two error shapes (see :mod:`vajra.http._errors`).
A caller that goes away cancels its generation at the gateway (through the SDK).

Streams (``"stream": true``) are server-sent events. Their status is decided by the first
event: an error before any text (bad key, unknown adapter, limits, validation) is answered
as a normal JSON error with its status; an error after the stream started is sent as one
``data: {"error": …}`` event, and the stream ends.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import trio
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from vajra.client import AdapterInfo, InferenceResult, StreamChunk, Usage, VajraError
from vajra.client._types import new_request_id
from vajra.config import VajraConfig
from vajra.errors import RateLimited
from vajra.http import _schemas as s
from vajra.http._chat import ChatTemplate
from vajra.http._errors import ApiError, error_response, sse_error
from vajra.http._gateway import GatewayPool
from vajra.http._limits import BodySizeLimit
from vajra.http._metrics import BridgeMetrics
from vajra.http._uploads import AdapterFiles, check_size, too_large, unpack_archive

log = logging.getLogger("vajra.http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Emit = Callable[[bytes], Awaitable[None]]

_OPENAI_EXACT = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})
_DONE = b"data: [DONE]\n\n"


def is_openai_path(path: str) -> bool:
    """OpenAI's routes answer errors in OpenAI's shape; ``/v1/models/{id}`` is one of them."""
    return path in _OPENAI_EXACT or (path.startswith("/v1/models/") and path.count("/") == 3)


def render_error(err: ApiError, path: str) -> Response:
    return error_response(err, openai=is_openai_path(path))


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class BridgeContext:
    """Everything the routes share; built by :class:`~vajra.http.HttpBridge` (or a test)."""

    cfg: VajraConfig
    pool: GatewayPool
    metrics: BridgeMetrics
    chat: ChatTemplate
    base_model: str


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


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


class EventStream(Response):
    """A server-sent-event response whose status is decided by its first event.

    ``produce(emit)`` generates the events. If it fails before emitting, the failure is
    answered as an ordinary JSON error; after, as one error event. A client that disconnects
    cancels ``produce`` (the request is abandoned in the SDK).
    """

    media_type = "text/event-stream"

    def __init__(self, produce: Callable[[Emit], Awaitable[None]], *, openai: bool) -> None:
        self._produce = produce
        self._openai = openai
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        started = False
        failure: ApiError | None = None

        async def emit(data: bytes) -> None:
            nonlocal started
            if not started:
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                started = True
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def produce(done: trio.CancelScope) -> None:
            nonlocal failure
            try:
                await self._produce(emit)
            except ApiError as exc:
                failure = exc
            except VajraError as exc:
                failure = ApiError.from_vajra(exc)
            except UnicodeEncodeError:
                failure = ApiError(400, "invalid_request", "text must be valid UTF-8")
            except Exception:
                log.exception("a stream failed")
                failure = ApiError(500, "internal", "internal error in the HTTP bridge")
            finally:
                done.cancel()

        async def until_disconnect(done: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            done.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, nursery.cancel_scope)
            nursery.start_soon(until_disconnect, nursery.cancel_scope)
        if failure is not None and not started:
            await error_response(failure, openai=self._openai)(scope, receive, send)
            return
        if not started:  # cancelled by a disconnect before the first event
            return
        if failure is not None:
            await send(
                {
                    "type": "http.response.body",
                    "body": sse_error(failure, openai=self._openai),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class Generator:
    """What every generation route shares: the call, the limits' metric, the metrics."""

    def __init__(self, ctx: BridgeContext) -> None:
        self.ctx = ctx
        self.timeout_s = ctx.cfg.http.request_timeout_s

    @contextmanager
    def counting_limits(self) -> Iterator[None]:
        """Count the gateway's per-tenant refusals (raised on as they are: 429)."""
        try:
            yield
        except RateLimited as exc:
            self.ctx.metrics.limited.labels(exc.code.value).inc()
            raise

    async def complete(self, api_key: str, gen: Generation, route: str) -> InferenceResult:
        t0 = trio.current_time()
        with self.counting_limits(), self.ctx.pool.guard():
            result = await self.ctx.pool.client(api_key).infer(
                gen.prompt,
                adapter=gen.adapter,
                max_tokens=gen.max_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p,
                stop=gen.stop,
                seed=gen.seed,
                timeout_s=self.timeout_s,
            )
        self.ctx.metrics.observe_generation(
            route,
            adapter=gen.adapter is not None,
            usage=result.usage,
            e2e_s=trio.current_time() - t0,
            ttft_s=None,
        )
        return result

    async def stream(
        self,
        api_key: str,
        gen: Generation,
        route: str,
        on_chunk: Callable[[StreamChunk], Awaitable[None]],
    ) -> StreamChunk:
        """Stream ``gen``, handing each chunk to ``on_chunk``; returns the final chunk."""
        t0 = trio.current_time()
        ttft: float | None = None
        final: StreamChunk | None = None
        with self.counting_limits(), self.ctx.pool.guard():
            stream = self.ctx.pool.client(api_key).stream(
                gen.prompt,
                adapter=gen.adapter,
                max_tokens=gen.max_tokens,
                temperature=gen.temperature,
                top_p=gen.top_p,
                stop=gen.stop,
                seed=gen.seed,
                timeout_s=self.timeout_s,
            )
            async with stream as chunks:  # leaving early (a disconnect) cancels it
                async for chunk in chunks:
                    if ttft is None:
                        ttft = trio.current_time() - t0
                    if chunk.is_final:
                        final = chunk
                    await on_chunk(chunk)
        if final is None or final.usage is None:
            raise ApiError(502, "malformed_frame", "the stream ended without a final chunk")
        self.ctx.metrics.observe_generation(
            route,
            adapter=gen.adapter is not None,
            usage=final.usage,
            e2e_s=trio.current_time() - t0,
            ttft_s=ttft,
        )
        return final


def _usage_body(u: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def _finish(reason: str | None) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _json(obj: object, status: int = 200) -> Response:
    return Response(
        json.dumps(obj, separators=(",", ":")), status_code=status, media_type="application/json"
    )


def _errors(model: type, *codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "Invalid request; `field`/`param` names the input to blame",
        401: "Missing, unknown or revoked API key (or admin key)",
        403: "A tenant quota would be passed (`quota_exceeded`); delete something first",
        404: "No such model, adapter or tenant, or one that belongs to another tenant",
        413: "Request body too large",
        429: "Per-tenant rate or concurrency limit; see Retry-After",
        503: "The gateway is down, shutting down or overloaded; see Retry-After",
        504: "The request's deadline passed",
    }
    return {c: {"model": model, "description": text[c]} for c in codes}


_SSE_DOC = {
    "text/event-stream": {
        "schema": {"type": "string"},
        "example": 'data: {"choices":[{"text":" the","index":0}]}\n\ndata: [DONE]\n\n',
    }
}

#: Multipart fields of ``POST /v1/adapters``: the PEFT directory's two files, or one archive.
CONFIG_FIELD = "adapter_config.json"
WEIGHTS_FIELD = "adapter_model.safetensors"
ARCHIVE_FIELD = "archive"
_UPLOAD_FIELDS = frozenset({"name", CONFIG_FIELD, WEIGHTS_FIELD, ARCHIVE_FIELD})
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
    }


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


async def _read_upload(upload: UploadFile, field: str, max_bytes: int) -> bytes:
    if upload.size is not None and upload.size > max_bytes:
        raise too_large(upload.size, max_bytes, f"the {field} part", field=field)
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(len(data), max_bytes, f"the {field} part", field=field)
    return data


_bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY`")


async def api_key(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if creds is None or not creds.credentials:
        raise ApiError(401, "auth_failed", "missing API key: send `Authorization: Bearer KEY`")
    return creds.credentials


def create_app(ctx: BridgeContext) -> FastAPI:
    """The bridge's FastAPI application over ``ctx`` (which must be running)."""
    app = FastAPI(
        title="Vajra HTTP bridge",
        version="1.0",
        description=(
            "Serverless multi-tenant LoRA serving. The paper's API (`/v1/models/{model_id}/infer`,"
            " `/v1/usage/{tenant_id}/metrics`), an OpenAI-compatible API (`/v1/completions`, "
            "`/v1/chat/completions`, `/v1/models`), tenant administration under the admin key, "
            "and Prometheus metrics. Authenticate with `Authorization: Bearer KEY`."
        ),
    )
    gen = Generator(ctx)
    base = ctx.base_model
    price = ctx.cfg.policies

    # --- errors -----------------------------------------------------------------------------

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return render_error(exc, request.url.path)

    async def on_vajra_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, VajraError)
        err = ApiError.from_vajra(exc)
        if is_openai_path(request.url.path) and err.field == "adapter":
            err.field = "model"
        return render_error(err, request.url.path)

    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ())]
        if loc and loc[0] in ("body", "path", "query", "header"):
            loc = loc[1:]
        field = ".".join(loc) or None
        message = f"{field}: {first.get('msg', 'invalid')}" if field else "invalid request body"
        return render_error(
            ApiError(400, "invalid_request", message, field=field), request.url.path
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "invalid_request" if exc.status_code == 400 else "http_error"
        )
        err = ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers)
        return render_error(err, request.url.path)

    async def on_unicode(request: Request, exc: Exception) -> Response:
        return render_error(
            ApiError(400, "invalid_request", "text must be valid UTF-8"), request.url.path
        )

    async def on_crash(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return render_error(
            ApiError(500, "internal", "internal error in the HTTP bridge"), request.url.path
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(VajraError, on_vajra_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(UnicodeEncodeError, on_unicode)
    app.add_exception_handler(Exception, on_crash)

    # --- the paper's API --------------------------------------------------------------------

    @app.post(
        "/v1/models/{model_id}/infer",
        tags=["paper"],
        summary="Generate with the base model or one of the caller's adapters",
        response_model=s.InferResponse,
        responses={
            200: {"content": _SSE_DOC},
            **_errors(s.ErrorBody, 400, 401, 404, 413, 429, 503, 504),
        },
    )
    async def infer(model_id: str, body: s.InferBody, key: str = Depends(api_key)) -> Response:
        if model_id != base:
            raise ApiError(404, "model_not_found", f"no model {model_id!r}", field="model_id")
        p = body.parameters
        g = Generation(
            body.prompt,
            body.adapter_id,
            p.max_tokens,
            p.temperature,
            p.top_p,
            _stops(p.stop),
            p.seed,
        )
        route = "/v1/models/{model_id}/infer"
        if not body.stream:
            r = await gen.complete(key, g, route)
            return _json(
                {
                    "id": r.request_id,
                    "model": base,
                    "adapter_id": body.adapter_id,
                    "text": r.text,
                    "finish_reason": _finish(r.finish_reason),
                    "usage": {**_usage_body(r.usage), "gpu_ms": r.usage.gpu_ms},
                }
            )

        async def produce(emit: Emit) -> None:
            async def on_chunk(c: StreamChunk) -> None:
                event: dict[str, object] = {"id": c.request_id, "index": c.index, "text": c.text}
                if c.is_final and c.usage is not None:
                    event["finish_reason"] = _finish(c.finish_reason)
                    event["usage"] = {**_usage_body(c.usage), "gpu_ms": c.usage.gpu_ms}
                else:
                    event["finish_reason"] = None
                await emit(_sse(event))

            await gen.stream(key, g, route, on_chunk)
            await emit(_DONE)

        return EventStream(produce, openai=False)

    @app.get(
        "/v1/usage/{tenant_id}/metrics",
        tags=["paper"],
        summary="The caller's own usage totals and cost (another tenant's id: 404)",
        response_model=s.UsageMetrics,
        responses=_errors(s.ErrorBody, 400, 401, 404, 503, 504),
    )
    async def usage(tenant_id: str, key: str = Depends(api_key)) -> Response:
        with ctx.pool.guard():
            u = await ctx.pool.client(key).usage(tenant_id, timeout_s=10.0)
        cost = u.gpu_ms * price.gpu_price_per_hour / 3_600_000 * price.tenancy_factor
        return _json(
            {
                "tenant_id": u.tenant_id,
                "name": u.name,
                "requests": u.requests,
                "gpu_ms": u.gpu_ms,
                "prompt_tokens": u.prompt_tokens,
                "completion_tokens": u.completion_tokens,
                "total_tokens": u.prompt_tokens + u.completion_tokens,
                "cost_usd": cost,
            }
        )

    # --- OpenAI-compatible ------------------------------------------------------------------

    def _adapter_of(model: str) -> str | None:
        return None if model == base else model

    def _sampling(body: s._OpenAISampling, max_tokens: int | None, default: int) -> dict[str, Any]:
        if body.n not in (None, 1):
            raise ApiError(400, "invalid_request", "only n=1 is supported", field="n")
        return {
            "max_tokens": max_tokens if max_tokens is not None else default,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "stop": _stops(body.stop),
            "seed": body.seed,
        }

    @app.post(
        "/v1/completions",
        tags=["openai"],
        summary="OpenAI text completion (`model`: the base model or ADAPTER[@VERSION])",
        response_model=s.Completion,
        responses={
            200: {"content": _SSE_DOC},
            **_errors(s.OpenAIErrorBody, 400, 401, 404, 413, 429, 503, 504),
        },
    )
    async def completions(body: s.CompletionRequest, key: str = Depends(api_key)) -> Response:
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
        g = Generation(prompts[0], _adapter_of(body.model), **_sampling(body, body.max_tokens, 16))
        route = "/v1/completions"
        rid, created = f"cmpl-{new_request_id()}", int(time.time())
        if not body.stream:
            r = await gen.complete(key, g, route)
            choice = {"text": r.text, "index": 0, "logprobs": None}
            choice["finish_reason"] = _finish(r.finish_reason)
            return _json(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": body.model,
                    "choices": [choice],
                    "usage": _usage_body(r.usage),
                }
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[dict[str, object]], **extra: object) -> bytes:
            head = {"id": rid, "object": "text_completion", "created": created}
            return _sse({**head, "model": body.model, "choices": choices, **extra})

        async def produce(emit: Emit) -> None:
            async def on_chunk(c: StreamChunk) -> None:
                reason = _finish(c.finish_reason) if c.is_final else None
                if c.text or reason:
                    choice = {"text": c.text, "index": 0, "logprobs": None}
                    await emit(chunk([{**choice, "finish_reason": reason}]))

            final = await gen.stream(key, g, route, on_chunk)
            if include_usage and final.usage is not None:
                await emit(chunk([], usage=_usage_body(final.usage)))
            await emit(_DONE)

        return EventStream(produce, openai=True)

    @app.post(
        "/v1/chat/completions",
        tags=["openai"],
        summary="OpenAI chat completion, through the model's chat template",
        response_model=s.ChatCompletion,
        responses={
            200: {"content": _SSE_DOC},
            **_errors(s.OpenAIErrorBody, 400, 401, 404, 413, 429, 503, 504),
        },
    )
    async def chat(body: s.ChatCompletionRequest, key: str = Depends(api_key)) -> Response:
        if body.logprobs:
            raise ApiError(400, "invalid_request", "logprobs is not supported", field="logprobs")
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
        prompt = ctx.chat.render(messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        g = Generation(prompt, _adapter_of(body.model), **_sampling(body, max_tokens, 64))
        route = "/v1/chat/completions"
        rid, created = f"chatcmpl-{new_request_id()}", int(time.time())
        if not body.stream:
            r = await gen.complete(key, g, route)
            return _json(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": body.model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": r.text},
                            "finish_reason": _finish(r.finish_reason),
                            "logprobs": None,
                        }
                    ],
                    "usage": _usage_body(r.usage),
                }
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[dict[str, object]], **extra: object) -> bytes:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created}
            return _sse({**head, "model": body.model, "choices": choices, **extra})

        async def produce(emit: Emit) -> None:
            first = True

            async def on_chunk(c: StreamChunk) -> None:
                nonlocal first
                delta: dict[str, str] = {"role": "assistant"} if first else {}
                first = False
                if c.text:
                    delta["content"] = c.text
                reason = _finish(c.finish_reason) if c.is_final else None
                if delta or reason:
                    choice = {"index": 0, "delta": delta, "logprobs": None}
                    await emit(chunk([{**choice, "finish_reason": reason}]))

            final = await gen.stream(key, g, route, on_chunk)
            if include_usage and final.usage is not None:
                await emit(chunk([], usage=_usage_body(final.usage)))
            await emit(_DONE)

        return EventStream(produce, openai=True)

    def _model_card(model_id: str, parent: str | None = None) -> dict[str, object]:
        return {
            "id": model_id,
            "object": "model",
            "created": 0,
            "owned_by": "vajra",
            "parent": parent,
        }

    async def _model_cards(key: str) -> list[dict[str, object]]:
        """The base model, then per adapter name: NAME (its active version), NAME@V per version.

        Listing authenticates the key at the gateway (uncached: a revoked key fails at once).
        """
        with ctx.pool.guard():
            adapters = await ctx.pool.client(key).list_adapters(timeout_s=10.0)
        cards = [_model_card(base)]
        for a in adapters:
            card = {**_model_card(a.ref, base), "created": a.created_ms // 1000}
            if a.active:
                cards.append({**card, "id": a.name})
            cards.append(card)
        return cards

    @app.get(
        "/v1/models",
        tags=["openai"],
        summary="The base model and the caller's adapters (NAME and every NAME@VERSION)",
        description=(
            "The base model (`parent` null), then for each of the caller's adapters one entry"
            " `NAME` (its active version) and one `NAME@VERSION` per version, each with"
            " `parent` = the base model. Any of these ids works as `model`."
        ),
        response_model=s.ModelList,
        responses=_errors(s.OpenAIErrorBody, 401, 503, 504),
    )
    async def models(key: str = Depends(api_key)) -> Response:
        return _json({"object": "list", "data": await _model_cards(key)})

    @app.get(
        "/v1/models/{model_id}",
        tags=["openai"],
        summary="One model the caller can use: the base, NAME or NAME@VERSION",
        response_model=s.ModelCard,
        responses=_errors(s.OpenAIErrorBody, 401, 404, 503, 504),
    )
    async def model(model_id: str, key: str = Depends(api_key)) -> Response:
        for card in await _model_cards(key):
            if card["id"] == model_id:
                return _json(card)
        raise ApiError(404, "not_found", f"no model {model_id!r}", field="model")

    @app.get(
        "/v1/models/{model_id}/versions",
        tags=["paper"],
        summary="Versions of the base model (one) or of one of the caller's adapters",
        description=(
            "`model_id` is the base model's name, an adapter NAME (all its versions) or"
            " NAME@VERSION (that one). Another tenant's adapter: 404, like a name that does"
            " not exist."
        ),
        response_model=s.ModelVersions,
        responses=_errors(s.ErrorBody, 401, 404, 503, 504),
    )
    async def versions(model_id: str, key: str = Depends(api_key)) -> Response:
        with ctx.pool.guard():
            adapters = await ctx.pool.client(key).list_adapters(timeout_s=10.0)
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
            return _json({"model_id": base, "parent": None, "versions": [one]})
        found = matching(adapters, model_id)
        if not found:
            raise ApiError(404, "not_found", f"adapter {model_id!r} not found", field="model_id")
        return _json(
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

    # --- adapters ---------------------------------------------------------------------------

    max_adapter_bytes = ctx.cfg.adapters.max_adapter_bytes

    @app.post(
        "/v1/adapters",
        tags=["adapters"],
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
        response_model=s.AdapterInfoBody,
        responses=_errors(s.ErrorBody, 400, 401, 403, 413, 429, 503, 504),
    )
    async def push_adapter(
        request: Request,
        name: Annotated[
            str,
            Form(
                min_length=1,
                max_length=64,
                pattern=s.ADAPTER_NAME_PATTERN,
                description="The adapter's name; each upload adds a version",
            ),
        ],
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
        key: str = Depends(api_key),
    ) -> Response:
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
        if archive is not None:
            if config_file is not None or weights_file is not None:
                raise ApiError(
                    400,
                    "invalid_request",
                    f"send either `{ARCHIVE_FIELD}` or the two files, not both",
                    field=ARCHIVE_FIELD,
                )
            data = await _read_upload(archive, ARCHIVE_FIELD, max_adapter_bytes)
            files = await trio.to_thread.run_sync(
                lambda: unpack_archive(data, max_bytes=max_adapter_bytes)
            )
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
                    await _read_upload(config_file, CONFIG_FIELD, max_adapter_bytes),
                    await _read_upload(weights_file, WEIGHTS_FIELD, max_adapter_bytes),
                ),
                max_adapter_bytes,
            )
        with gen.counting_limits(), ctx.pool.guard():
            info = await ctx.pool.client(key).push_adapter_bytes(
                files.config_json, files.weights, name, timeout_s=gen.timeout_s
            )
        return _json(adapter_body(info, base), 201)

    @app.get(
        "/v1/adapters",
        tags=["adapters"],
        summary="The caller's adapters, every version, by name then version",
        response_model=s.AdapterListBody,
        responses=_errors(s.ErrorBody, 401, 503, 504),
    )
    async def list_adapters(key: str = Depends(api_key)) -> Response:
        with ctx.pool.guard():
            adapters = await ctx.pool.client(key).list_adapters(timeout_s=10.0)
        return _json({"object": "list", "data": [adapter_body(a, base) for a in adapters]})

    @app.delete(
        "/v1/adapters/{name}",
        tags=["adapters"],
        summary="Delete an adapter: every version, or one (NAME@VERSION or ?version=)",
        description=(
            "Deleting the active version makes the newest remaining one active; deleting the"
            " last version deletes the name. Another tenant's adapter: 404, like a name that"
            " does not exist."
        ),
        response_model=s.AdapterDeleted,
        responses=_errors(s.ErrorBody, 400, 401, 404, 503, 504),
    )
    async def delete_adapter(
        name: str,
        version: Annotated[int | None, Query(ge=1, le=s.MAX_VERSION)] = None,
        key: str = Depends(api_key),
    ) -> Response:
        with ctx.pool.guard():
            deleted = await ctx.pool.client(key).delete_adapter(name, version, timeout_s=10.0)
        return _json({"deleted": [adapter_body(a, base) for a in deleted]})

    # --- administration (admin key) ----------------------------------------------------------

    @app.post(
        "/v1/admin/tenants",
        tags=["admin"],
        status_code=201,
        summary="Create a tenant; answers its first API key (shown once)",
        response_model=s.IssuedKeyBody,
        responses=_errors(s.ErrorBody, 400, 401, 503, 504),
    )
    async def create_tenant(body: s.TenantCreate, key: str = Depends(api_key)) -> Response:
        with ctx.pool.guard():
            issued = await ctx.pool.client(key).create_tenant(body.name, timeout_s=10.0)
        return _json(
            {"tenant_id": issued.tenant_id, "name": issued.name, "api_key": issued.api_key}, 201
        )

    @app.post(
        "/v1/admin/tenants/{tenant}/keys",
        tags=["admin"],
        status_code=201,
        summary="Issue another API key for a tenant (name or id)",
        response_model=s.IssuedKeyBody,
        responses=_errors(s.ErrorBody, 400, 401, 404, 503, 504),
    )
    async def create_key(tenant: str, key: str = Depends(api_key)) -> Response:
        with ctx.pool.guard():
            issued = await ctx.pool.client(key).create_api_key(tenant, timeout_s=10.0)
        return _json(
            {"tenant_id": issued.tenant_id, "name": issued.name, "api_key": issued.api_key}, 201
        )

    @app.post(
        "/v1/admin/keys/revoke",
        tags=["admin"],
        summary="Revoke an API key: refused from its next request on",
        response_model=s.Done,
        responses=_errors(s.ErrorBody, 400, 401, 404, 503, 504),
    )
    async def revoke_key(body: s.KeyRevoke, key: str = Depends(api_key)) -> Response:
        with ctx.pool.guard():
            await ctx.pool.client(key).revoke_api_key(body.api_key, timeout_s=10.0)
        return _json({"ok": True})

    @app.delete(
        "/v1/admin/tenants/{tenant}",
        tags=["admin"],
        summary="Delete a tenant (name or id) and all its keys",
        response_model=s.Done,
        responses=_errors(s.ErrorBody, 400, 401, 404, 503, 504),
    )
    async def delete_tenant(tenant: str, key: str = Depends(api_key)) -> Response:
        with ctx.pool.guard():
            await ctx.pool.client(key).delete_tenant(tenant, timeout_s=10.0)
        return _json({"ok": True})

    # --- operations -------------------------------------------------------------------------

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics (text format)",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        if ctx.pool.up and ctx.pool.admin_key:  # gateway-wide views need the admin key
            try:
                with trio.move_on_after(1.0):
                    executors = await ctx.pool.operator_client.cluster_status(timeout_s=1.0)
                    ctx.metrics.set_executors(executors)
            except VajraError as exc:
                log.debug("no executor status for /metrics: %s", exc)
        ctx.metrics.gateway_up.set(1 if ctx.pool.up else 0)
        ctx.metrics.gateway_inflight.set(ctx.pool.gateway_counters.get("inflight", 0))
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get(
        "/healthz",
        tags=["operations"],
        summary="Liveness; `gateway` says whether the gateway answers",
        response_model=s.Health,
    )
    async def healthz() -> Response:
        return _json({"status": "ok", "gateway": "up" if ctx.pool.up else "down"})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            # Validation errors are answered 400 (with the field), never FastAPI's 422.
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    op.get("responses", {}).pop("422", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(
        BodySizeLimit,
        max_bytes=ctx.cfg.http.max_body_bytes,
        render=render_error,
        per_path={"/v1/adapters": max_adapter_bytes + UPLOAD_OVERHEAD_BYTES},
        timeout_s=ctx.cfg.http.body_timeout_s,
    )
    app.add_middleware(_RequestMetrics, metrics=ctx.metrics)
    return app


class _RequestMetrics:
    """ASGI middleware: count each HTTP answer by route template, method and status."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, metrics: BridgeMetrics
    ) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(
                template, scope.get("method", ""), status, time.perf_counter() - t0
            )
