"""How a generation call says how to decode: a :class:`SamplingParams`, keywords, or both.

Every generation method of the SDK takes ``params=`` (a whole
:class:`~vajra.policies.decoding.SamplingParams`) and the keywords of
:class:`SamplingOptions` (one per field of it, plus OpenAI's ``response_format``); keywords
given override ``params``' fields. :func:`sampling_params` builds the result, so every bad
value raises :class:`~vajra.errors.InvalidRequest` naming its field before anything is sent.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from vajra.errors import InvalidRequest
from vajra.policies.decoding import SamplingParams, StructuredOutput

#: The most choices (``n``) one call may ask for; the HTTP routes take the same bound.
MAX_CHOICES = 16


class SamplingOptions(TypedDict, total=False):
    """The decoding keywords of the SDK's generation calls; see
    :class:`~vajra.policies.decoding.SamplingParams` for what each one does.

    ``stop`` may be one string; ``response_format`` is OpenAI's (``{"type": "text"}``,
    ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name": ...,
    "schema": {...}}}``), another way to give ``structured``.
    """

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: str | Sequence[str] | None
    seed: int | None
    stop_token_ids: Sequence[int]
    min_tokens: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    ignore_eos: bool
    logprobs: int | None
    prompt_logprobs: int | None
    structured: StructuredOutput | None
    response_format: Mapping[str, Any] | None


_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def sampling_params(params: SamplingParams | None, options: Mapping[str, Any]) -> SamplingParams:
    """``params`` (default: ``SamplingParams()``) with the fields ``options`` gives replaced.

    Raises InvalidRequest naming the first bad field (an unknown keyword included).
    """
    if params is not None and not isinstance(params, SamplingParams):
        raise InvalidRequest("params must be a SamplingParams", field="params")
    values = dict(options)
    for name in values:
        if name not in _FIELDS and name != "response_format":
            raise InvalidRequest(f"unknown decoding parameter {name!r}", field=name)
    if "stop" in values:
        stop = values["stop"]
        values["stop"] = (stop,) if isinstance(stop, str) else _as_tuple("stop", stop)
    if "stop_token_ids" in values:
        values["stop_token_ids"] = _as_tuple("stop_token_ids", values["stop_token_ids"])
    if "response_format" in values:
        structured = structured_output(values.pop("response_format"))
        if structured is not None:
            if values.get("structured") is not None:
                raise InvalidRequest(
                    "give structured or response_format, not both", field="response_format"
                )
            values["structured"] = structured
    base = params or SamplingParams()
    return dataclasses.replace(base, **values) if values else base


def _as_tuple(field: str, value: object) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidRequest(f"{field} must be a list", field=field)
    return tuple(value)


def structured_output(response_format: object) -> StructuredOutput | None:
    """OpenAI's ``response_format`` as a :class:`StructuredOutput` (None: unconstrained text).

    ``{"type": "json_schema"}`` without a ``schema`` asks for any JSON object, as
    ``json_object`` does.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidRequest("response_format must be an object", field="response_format")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise InvalidRequest(
                "response_format.json_schema must be an object with name and schema",
                field="response_format",
            )
        schema = spec.get("schema")
        return StructuredOutput("json_object") if schema is None else json_schema(schema)
    raise InvalidRequest(
        "response_format.type must be text, json_object or json_schema", field="response_format"
    )


def json_schema(schema: object, *, field: str = "response_format") -> StructuredOutput:
    """A JSON schema (an object, or its JSON text) as a :class:`StructuredOutput`."""
    if isinstance(schema, str):
        text = schema
    elif isinstance(schema, Mapping):
        try:
            text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            raise InvalidRequest("the JSON schema is not JSON", field=field) from None
    else:
        raise InvalidRequest("a JSON schema must be an object", field=field)
    try:
        return StructuredOutput("json_schema", text)
    except InvalidRequest as exc:
        raise InvalidRequest(exc.message, field=field) from None


def check_choices(n: int) -> None:
    """``n``, how many completions one call asks for, is 1..MAX_CHOICES."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be an integer between 1 and {MAX_CHOICES}", field="n")
