"""Bodies of the paper's generation route, ``POST /v1/models/{model_id}/infer``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vajra.http.schemas.decoding import DecodingFields, NativeLogprob
from vajra.policies.decoding import TOP_LOGPROBS_MAX
from vajra.policies.request_rules import (
    MAX_TOKENS_BOUND,
    SEED_MAX,
    STOP_STRINGS_BOUND,
    TEMPERATURE_MAX,
)


class InferParameters(DecodingFields):
    """How to decode; every field maps to the SamplingParams field of its name (``n``: that
    many choices; ``response_format`` and ``guided_*``: ``structured``)."""

    temperature: float = Field(0.0, ge=0.0, le=TEMPERATURE_MAX, description="0 is greedy")
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS_BOUND)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(
        None, description=f"Up to {STOP_STRINGS_BOUND} stop strings"
    )
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    logprobs: int | None = Field(
        None,
        ge=0,
        le=TOP_LOGPROBS_MAX,
        description="Per output token: its logprob and this many likeliest alternatives",
    )
    prompt_logprobs: int | None = Field(
        None, ge=0, le=TOP_LOGPROBS_MAX, description="The same for every prompt token"
    )


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
        False,
        description="Server-sent events: text chunks, a final chunk, then [DONE]; with n > 1 "
        "the choices' events interleave, each saying its `choice`, and each choice ends with "
        "a final event carrying its own usage",
    )


class InferUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    gpu_ms: float


class InferChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: list[NativeLogprob] | None = None


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
    text: str = Field(description="Choice 0's text")
    finish_reason: str
    usage: InferUsage = Field(description="Every choice's, the prompt counted once")
    logprobs: list[NativeLogprob] | None = Field(None, description="Choice 0's, when asked")
    prompt_logprobs: list[NativeLogprob] | None = None
    choices: list[InferChoice] = Field(default_factory=list, description="Every choice")
