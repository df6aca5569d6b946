"""From a route's body to the :class:`~vajra.policies.decoding.SamplingParams` it asks for,
and log-probabilities in each route's format.

Field mapping (every route): ``top_k`` (-1 or 0: all), ``min_tokens``, ``stop_token_ids``,
``presence_penalty``, ``frequency_penalty``, ``repetition_penalty`` and ``ignore_eos`` go to
the fields of the same name; ``response_format`` (``json_object``, ``json_schema``),
``guided_json``, ``guided_regex`` and ``guided_grammar`` (Lark) to ``structured``, one of
them at most. The routes set ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``,
``logprobs`` and ``prompt_logprobs`` from their own fields. A bad value is answered 400
naming the route's field.

Log-probabilities that are not finite (a token a grammar or a penalty rules out) are sent as
-9999.0, as vLLM does: JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from vajra.client import InvalidRequest, TokenLogprob
from vajra.client._decoding import json_schema, structured_output
from vajra.http._errors import ApiError
from vajra.http.schemas.decoding import DecodingFields
from vajra.policies.decoding import SamplingParams, StructuredOutput

#: What a log-probability that is not finite is sent as.
NOT_FINITE = -9999.0

_STRUCTURED_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_grammar")


def stop_list(stop: str | list[str] | None) -> list[str]:
    """``stop`` as the API takes it (one string, a list or nothing) as a list."""
    return [stop] if isinstance(stop, str) else list(stop or [])


def sampling_of(
    f: DecodingFields,
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: str | list[str] | None,
    seed: int | None,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The decoding a body asks for (InvalidRequest naming the field for a bad value)."""
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=0 if f.top_k is None or f.top_k == -1 else f.top_k,
        stop=tuple(stop_list(stop)),
        seed=seed,
        stop_token_ids=tuple(f.stop_token_ids or ()),
        min_tokens=f.min_tokens or 0,
        presence_penalty=f.presence_penalty or 0.0,
        frequency_penalty=f.frequency_penalty or 0.0,
        repetition_penalty=1.0 if f.repetition_penalty is None else f.repetition_penalty,
        ignore_eos=bool(f.ignore_eos),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        structured=structured_of(f),
    )


def _structured_fields(f: DecodingFields) -> list[str]:
    given = [name for name in _STRUCTURED_FIELDS if getattr(f, name) is not None]
    if f.response_format is not None and f.response_format.type == "text":
        given.remove("response_format")  # no constraint
    return given


def field_names(f: DecodingFields, **renames: str) -> dict[str, str]:
    """How the fields an error names (SamplingParams' names) are called in the body ``f``:
    ``renames`` plus ``response_format`` as the structured-output field ``f`` used."""
    given = _structured_fields(f)
    if given and given[0] != "response_format":
        renames["response_format"] = given[0]
    return renames


def structured_of(f: DecodingFields) -> StructuredOutput | None:
    """The one structured-output constraint ``f`` gives, if any."""
    given = _structured_fields(f)
    if len(given) > 1:
        raise ApiError(
            400,
            "invalid_request",
            f"give at most one of {', '.join(_STRUCTURED_FIELDS)}; got {', '.join(given)}",
            field=given[1],
        )
    if not given:
        return None
    which = given[0]
    try:
        if f.response_format is not None and which == "response_format":
            return structured_output(f.response_format.model_dump(by_alias=True))
        if f.guided_json is not None:
            return json_schema(f.guided_json, field="guided_json")
        if f.guided_regex is not None:
            return StructuredOutput("regex", f.guided_regex)
        assert f.guided_grammar is not None
        return StructuredOutput("lark", f.guided_grammar)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, field=which) from None


def _lp(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else NOT_FINITE


# --- OpenAI's legacy completion format ----------------------------------------------------


def legacy_logprobs(entries: Sequence[TokenLogprob], offset: int) -> dict[str, list[Any]]:
    """``entries`` as a completion choice's ``logprobs``; the first token's text starts at
    character ``offset`` of the choice's text. A prompt's first token has nulls."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for e in entries:
        tokens.append(e.token)
        text_offset.append(offset)
        offset += len(e.token)
        if e.logprob is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        lp = _lp(e.logprob)
        token_logprobs.append(lp)
        top = {token: _lp(value) for _, token, value in e.top}
        top.setdefault(e.token, lp)  # the chosen token is always among them
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def echoed_legacy_logprobs(
    prompt: str, prompt_entries: Sequence[TokenLogprob], entries: Sequence[TokenLogprob]
) -> dict[str, list[Any]]:
    """With ``echo``: the prompt's tokens (offsets from 0), then the completion's (offsets
    from the prompt's length: the choice's text is the prompt then the completion)."""
    head = legacy_logprobs(prompt_entries, 0)
    tail = legacy_logprobs(entries, len(prompt))
    return {key: head[key] + tail[key] for key in head}


# --- OpenAI's chat format -----------------------------------------------------------------


def chat_logprobs(entries: Sequence[TokenLogprob], top_k: int) -> dict[str, Any]:
    """``entries`` as a chat choice's ``logprobs`` (``top_logprobs``: ``top_k`` per token)."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": _lp(e.logprob),
                "bytes": list(e.token.encode()),
                "top_logprobs": [
                    {"token": token, "logprob": _lp(value), "bytes": list(token.encode())}
                    for _, token, value in e.top[:top_k]
                ],
            }
            for e in entries
        ],
        "refusal": None,
    }


# --- the paper API's format ---------------------------------------------------------------


def native_logprobs(entries: Sequence[TokenLogprob] | None) -> list[dict[str, Any]] | None:
    """``entries`` as the paper API sends them (None stays None)."""
    if entries is None:
        return None
    return [
        {
            "token_id": e.token_id,
            "token": e.token,
            "logprob": None if e.logprob is None else _lp(e.logprob),
            "top": [
                {"token_id": tid, "token": token, "logprob": _lp(value)}
                for tid, token, value in e.top
            ],
        }
        for e in entries
    ]
