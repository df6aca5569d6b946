"""Bodies of OpenAI's generation routes, ``/v1/completions`` and ``/v1/chat/completions``.

Requests allow fields this bridge does not know (OpenAI adds them often); fields it knows but
does not support (``suffix``, ``best_of`` other than ``n``) are refused by the routes. Beyond
OpenAI's own fields both take vLLM's extensions (:class:`~vajra.http.schemas.decoding.
DecodingFields`: ``top_k``, ``min_tokens``, ``stop_token_ids``, ``repetition_penalty``,
``ignore_eos``, ``guided_json``, ``guided_regex``, ``guided_grammar``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from vajra.http.schemas.decoding import (
    ChatLogprobs,
    CompletionLogprobs,
    DecodingFields,
)
from vajra.policies.decoding import TOP_LOGPROBS_MAX
from vajra.policies.request_rules import MAX_TOKENS_BOUND, SEED_MAX, TEMPERATURE_MAX


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAISampling(DecodingFields):
    """What both generation requests take: the model and its sampling parameters."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="The base model's name, or ADAPTER[@VERSION]")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_BOUND)
    temperature: float | None = Field(None, ge=0.0, le=TEMPERATURE_MAX)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(OpenAISampling):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [{"model": "tiny", "prompt": "Once upon a time", "max_tokens": 16}]
        },
    )
    prompt: str | list[str] = Field(description="One prompt (a list must hold exactly one)")
    echo: bool | None = Field(
        None, description="Prepend the prompt to each choice (with its logprobs, if asked)"
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=TOP_LOGPROBS_MAX,
        description="Per token: its logprob and this many likeliest alternatives",
    )
    best_of: int | None = Field(None, ge=1, description="Only equal to n is supported")
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, object]] | None = None


class ChatCompletionRequest(OpenAISampling):
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
    logprobs: bool | None = Field(None, description="Each output token's logprob")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=TOP_LOGPROBS_MAX,
        description="With logprobs: this many likeliest alternatives per token",
    )


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None


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
