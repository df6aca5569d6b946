"""The decoding fields every generation route takes beyond OpenAI's basic ones, and the
log-probability bodies the routes answer with.

Each field maps to the :class:`~vajra.policies.decoding.SamplingParams` field of the same name
(see :mod:`vajra.http._decoding`); the bounds are SamplingParams' own. ``response_format``
and vLLM's ``guided_json`` / ``guided_regex`` / ``guided_grammar`` (a Lark grammar) are four
ways to give its ``structured``: at most one per request.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vajra.client import MAX_CHOICES
from vajra.policies.decoding import (
    MAX_TOKENS_BOUND,
    PENALTY_MAX,
    REPETITION_PENALTY_MAX,
    STOP_TOKEN_IDS_BOUND,
    STRUCTURED_SPEC_MAX_CHARS,
    TOKEN_ID_MAX,
    TOP_K_MAX,
)

TokenId = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``response_format.json_schema``: ``schema`` constrains the output."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        None, alias="schema", description="A JSON schema; absent: any JSON object"
    )
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any JSON object) or
    ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class DecodingFields(BaseModel):
    """What every generation route takes besides max_tokens, temperature, top_p, stop, seed."""

    n: int | None = Field(
        None,
        ge=1,
        le=MAX_CHOICES,
        description=f"How many choices (1..{MAX_CHOICES}), sent together; the prompt's "
        "tokens are counted once in the usage",
    )
    top_k: int | None = Field(
        None, ge=-1, le=TOP_K_MAX, description="Keep the k likeliest tokens; 0 or -1: all"
    )
    min_tokens: int | None = Field(
        None, ge=0, le=MAX_TOKENS_BOUND, description="EOS and stop_token_ids wait this long"
    )
    stop_token_ids: list[TokenId] | None = Field(
        None, max_length=STOP_TOKEN_IDS_BOUND, description="Token ids that end the completion"
    )
    presence_penalty: float | None = Field(None, ge=-PENALTY_MAX, le=PENALTY_MAX)
    frequency_penalty: float | None = Field(None, ge=-PENALTY_MAX, le=PENALTY_MAX)
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=REPETITION_PENALTY_MAX, description="1: off"
    )
    ignore_eos: bool | None = Field(None, description="Keep going past EOS, up to max_tokens")
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = Field(
        None, description="vLLM's: a JSON schema the output follows"
    )
    guided_regex: str | None = Field(
        None,
        min_length=1,
        max_length=STRUCTURED_SPEC_MAX_CHARS,
        description="vLLM's: a regular expression the output matches",
    )
    guided_grammar: str | None = Field(
        None,
        min_length=1,
        max_length=STRUCTURED_SPEC_MAX_CHARS,
        description="vLLM's: a Lark grammar the output follows",
    )


# --- answers ------------------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completion ``logprobs``: per token its text, log-probability, the
    likeliest alternatives with the chosen token, and its character offset in the text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class NativeTopLogprob(BaseModel):
    token_id: int
    token: str
    logprob: float


class NativeLogprob(BaseModel):
    """One token of the paper API's ``logprobs`` / ``prompt_logprobs``; ``logprob`` is null
    only for a prompt's first token."""

    token_id: int
    token: str
    logprob: float | None
    top: list[NativeTopLogprob]
