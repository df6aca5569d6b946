"""Request and response bodies of every route, with the examples shown in ``/docs``.

Bounds here are the loose, static ones (types, signs, sizes that keep numbers on the wire);
the gateway applies the cluster's configured limits (``gateway.max_tokens_limit``,
``gateway.max_prompt_chars``, …) and its refusals come back as 400 naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

MAX_SEED = 2**63 - 1
MAX_TOKENS_BOUND = 1_000_000

# --- errors ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable error code, e.g. invalid_request, not_found")
    message: str
    field: str | None = Field(None, description="The input to blame, when there is one")


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_request",
                        "message": "max_tokens must be between 1 and 4096",
                        "field": "max_tokens",
                    }
                }
            ]
        }
    )
    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "message": "adapter 'nope' not found",
                        "type": "invalid_request_error",
                        "param": "model",
                        "code": "not_found",
                    }
                }
            ]
        }
    )
    error: OpenAIErrorDetail


# --- the paper's API ---------------------------------------------------------------------------


class InferParameters(BaseModel):
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 is greedy")
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS_BOUND)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 8 stop strings")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)


class InferBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "prompt": "Once upon a time",
                    "adapter_id": None,
                    "parameters": {"temperature": 0.7, "max_tokens": 32},
                }
            ]
        }
    )
    prompt: str = Field(min_length=1)
    adapter_id: str | None = Field(
        None, description="The tenant's adapter, NAME or NAME@VERSION; null: the base model"
    )
    parameters: InferParameters = Field(default_factory=lambda: InferParameters.model_validate({}))
    stream: bool = Field(
        False, description="Server-sent events: text chunks, a final chunk, then [DONE]"
    )


class InferUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    gpu_ms: float


class InferResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "0f3c…",
                    "model": "tiny",
                    "adapter_id": None,
                    "text": " there was a river",
                    "finish_reason": "length",
                    "usage": {
                        "prompt_tokens": 4,
                        "completion_tokens": 5,
                        "total_tokens": 9,
                        "gpu_ms": 12.5,
                    },
                }
            ]
        }
    )
    id: str
    model: str
    adapter_id: str | None
    text: str
    finish_reason: str
    usage: InferUsage


class UsageMetrics(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant_id": "t_0123456789abcdef",
                    "name": "acme",
                    "requests": 12,
                    "gpu_ms": 830.0,
                    "prompt_tokens": 120,
                    "completion_tokens": 384,
                    "total_tokens": 504,
                    "cost_usd": 0.0000138,
                }
            ]
        }
    )
    tenant_id: str
    name: str
    requests: int
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float = Field(
        description="gpu_ms x gpu_price_per_hour / 3,600,000 x tenancy_factor (paper A.2)"
    )


# --- OpenAI-compatible -------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAISampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="The base model's name, or ADAPTER[@VERSION]")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND)
    temperature: float | None = Field(None, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int | None = Field(None, ge=1, le=128, description="Only 1 is supported")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_OpenAISampling):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [{"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16}]
        },
    )
    prompt: str | list[str] = Field(description="One prompt (a list must hold exactly one)")
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, object]] | None = None


class ChatCompletionRequest(_OpenAISampling):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "Tell me about the river"}],
                    "max_tokens": 16,
                }
            ]
        },
    )
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND)
    logprobs: bool | None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: str | None


class Completion(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "cmpl-0f3c",
                    "object": "text_completion",
                    "created": 1730000000,
                    "model": "tiny",
                    "choices": [
                        {"text": " there", "index": 0, "logprobs": None, "finish_reason": "length"}
                    ],
                    "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
                }
            ]
        }
    )
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "chatcmpl-0f3c",
                    "object": "chat.completion",
                    "created": 1730000000,
                    "model": "tiny",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "The river"},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
                }
            ]
        }
    )
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="For an adapter: the base model it adapts")


class ModelList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "list",
                    "data": [
                        {
                            "id": "tiny",
                            "object": "model",
                            "created": 0,
                            "owned_by": "vajra",
                            "parent": None,
                        }
                    ],
                }
            ]
        }
    )
    object: Literal["list"]
    data: list[ModelCard]


# --- admin -------------------------------------------------------------------------------------


class TenantCreate(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "acme"}]})
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class KeyRevoke(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"api_key": "vk_…"}]})
    api_key: str = Field(min_length=1, max_length=256)


class IssuedKeyBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"tenant_id": "t_0123456789abcdef", "name": "acme", "api_key": "vk_…"}]
        }
    )
    tenant_id: str
    name: str
    api_key: str = Field(description="Shown only in this answer")


class Done(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ok": True}]})
    ok: bool


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "gateway": "up"}]})
    status: str
    gateway: Literal["up", "down"]


# --- adapters ----------------------------------------------------------------------------------

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_VERSION = 2**53

_ADAPTER_EXAMPLE: JsonDict = {
    "name": "support-bot",
    "version": 3,
    "ref": "support-bot@3",
    "digest": "9f2c4e…",
    "size_bytes": 1_327_104,
    "rank": 8,
    "lora_alpha": 16.0,
    "target_modules": ["q_proj", "v_proj"],
    "active": True,
    "created_ms": 1_730_000_000_000,
    "parent": "tiny",
}


class AdapterInfoBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_ADAPTER_EXAMPLE]})
    name: str
    version: int = Field(description="Versions count up from 1 per name and tenant")
    ref: str = Field(description="NAME@VERSION: what `model`/`adapter_id` names to pin it")
    digest: str = Field(description="sha256 hex over adapter_config.json then the weights")
    size_bytes: int
    rank: int
    lora_alpha: float
    target_modules: list[str]
    active: bool = Field(description="Whether plain NAME resolves to this version")
    created_ms: int = Field(description="Unix time of the upload, milliseconds")
    parent: str = Field(description="The base model it adapts")


class AdapterListBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"object": "list", "data": [_ADAPTER_EXAMPLE]}]}
    )
    object: Literal["list"]
    data: list[AdapterInfoBody]


class AdapterDeleted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"deleted": [_ADAPTER_EXAMPLE]}]})
    deleted: list[AdapterInfoBody] = Field(description="The versions deleted")


class ModelVersion(BaseModel):
    version: int
    ref: str = Field(description="What to send as `model` / `adapter_id` to use this version")
    active: bool
    digest: str | None = Field(None, description="Adapters only")
    size_bytes: int | None = Field(None, description="Adapters only")
    rank: int | None = Field(None, description="Adapters only")
    created_ms: int | None = Field(None, description="Adapters only")


class ModelVersions(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": "support-bot",
                    "parent": "tiny",
                    "versions": [
                        {
                            "version": 1,
                            "ref": "support-bot@1",
                            "active": False,
                            "digest": "0c1d…",
                            "size_bytes": 1_327_104,
                            "rank": 8,
                            "created_ms": 1_729_000_000_000,
                        },
                        {
                            "version": 2,
                            "ref": "support-bot@2",
                            "active": True,
                            "digest": "9f2c…",
                            "size_bytes": 1_327_104,
                            "rank": 8,
                            "created_ms": 1_730_000_000_000,
                        },
                    ],
                }
            ]
        }
    )
    model_id: str
    parent: str | None = Field(description="The base model, for an adapter; null for the base")
    versions: list[ModelVersion]
