"""How one request is decoded: :class:`SamplingParams`, the one definition every layer uses.

The client SDK builds it, the wire carries it, the gateway checks it against the cluster's
limits (:func:`~vajra.policies.request_rules.check_sampling`), and the engine decodes with
it. Construction applies every intrinsic rule and raises
:class:`~vajra.errors.InvalidRequest` naming the first bad field, so an instance is always
valid. Pure code: no I/O, no torch.

Semantics of the fields, per generated token (the engine's sampler implements exactly this):

1. ``logits`` of the next token; ``repetition_penalty`` divides positive and multiplies
   negative logits of every token seen so far (prompt and completion); ``presence_penalty``
   and ``frequency_penalty`` subtract ``presence * [count > 0] + frequency * count`` over the
   completion's tokens (OpenAI's definition);
2. until ``min_tokens`` completion tokens exist, EOS and ``stop_token_ids`` are masked out;
   ``ignore_eos`` masks EOS always; ``structured`` masks every token its grammar forbids;
3. ``temperature == 0``: the most likely remaining token (greedy); otherwise softmax of
   ``logits / temperature``, keep the ``top_k`` most likely (0: all), keep the smallest set
   whose mass reaches ``top_p`` (tokens tied with the last one kept stay), draw with the
   request's own random stream (seeded by ``seed``);
4. the request ends after EOS (unless ignored), a token of ``stop_token_ids`` (after
   ``min_tokens``), a ``stop`` string (the text is cut before it), a grammar that admits
   nothing more, or ``max_tokens`` tokens (structured output may then be incomplete, as
   OpenAI's is). JSON under ``structured`` is laid out as ``json.dumps`` does it (one line,
   ``", "`` and ``": "``): no free whitespace for a model to loop in.

``logprobs`` (None: none) asks for each chosen token's log-probability and its ``logprobs``
most likely alternatives, computed from the logits after step 1's penalties and before the
temperature (what the model says); ``prompt_logprobs`` the same for every prompt token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal

from vajra.errors import InvalidRequest

#: ``seed`` is an unsigned 63-bit integer (a torch generator's seed range).
SEED_MAX = 2**63 - 1
#: ``temperature`` is in [0, TEMPERATURE_MAX]; 0 is greedy.
TEMPERATURE_MAX = 5.0
#: The largest ``max_tokens`` any schema accepts; a cluster's configured limit is lower.
MAX_TOKENS_BOUND = 1_000_000
#: The most stop strings any schema accepts; a cluster's configured limit may be lower.
STOP_STRINGS_BOUND = 8
#: ``top_k`` is in [0, TOP_K_MAX]; 0 keeps every token.
TOP_K_MAX = 1_000_000
#: At most this many ``stop_token_ids``, each in [0, TOKEN_ID_MAX].
STOP_TOKEN_IDS_BOUND = 32
TOKEN_ID_MAX = 2**31 - 1
#: ``presence_penalty`` and ``frequency_penalty`` are in [-PENALTY_MAX, PENALTY_MAX].
PENALTY_MAX = 2.0
#: ``repetition_penalty`` is in (0, REPETITION_PENALTY_MAX]; 1 is off.
REPETITION_PENALTY_MAX = 10.0
#: ``logprobs`` / ``prompt_logprobs`` ask for at most this many alternatives per token.
TOP_LOGPROBS_MAX = 20
#: A structured-output spec (JSON schema, regex or Lark grammar) is at most this many chars.
STRUCTURED_SPEC_MAX_CHARS = 65_536
#: A JSON schema nests at most this deep.
SCHEMA_MAX_DEPTH = 32

StructuredKind = Literal["json_object", "json_schema", "regex", "lark"]
STRUCTURED_KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "lark")


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """Output constrained by a grammar: ``kind`` and its ``spec`` (empty for json_object:
    any JSON object; a JSON schema's text; a regular expression; a Lark grammar)."""

    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequest(
                f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}",
                field="response_format",
            )
        if not isinstance(self.spec, str) or len(self.spec) > STRUCTURED_SPEC_MAX_CHARS:
            raise InvalidRequest(
                f"structured output spec must be a string of at most "
                f"{STRUCTURED_SPEC_MAX_CHARS} characters",
                field="response_format",
            )
        if self.kind == "json_object" and self.spec:
            raise InvalidRequest("json_object takes no spec", field="response_format")
        if self.kind != "json_object" and not self.spec:
            raise InvalidRequest(f"{self.kind} needs a spec", field="response_format")
        if self.kind == "json_schema":
            _check_schema_text(self.spec)


def _check_schema_text(text: str) -> None:
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(
            f"json_schema is not valid JSON: {exc}", field="response_format"
        ) from None
    if not isinstance(schema, dict):
        raise InvalidRequest("json_schema must be a JSON object", field="response_format")
    if _depth(schema) > SCHEMA_MAX_DEPTH:
        raise InvalidRequest(
            f"json_schema nests deeper than {SCHEMA_MAX_DEPTH}", field="response_format"
        )


def _depth(value: object) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]
    return deepest


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request is decoded (see the module docstring); always valid once built."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        _int_in("max_tokens", self.max_tokens, 1, MAX_TOKENS_BOUND)
        _float_in("temperature", self.temperature, 0.0, TEMPERATURE_MAX)
        if not (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidRequest("top_p must be in (0, 1]", field="top_p")
        _int_in("top_k", self.top_k, 0, TOP_K_MAX)
        if not isinstance(self.stop, tuple) or any(
            not isinstance(s, str) or not s for s in self.stop
        ):
            raise InvalidRequest("stop strings must be non-empty strings", field="stop")
        if len(self.stop) > STOP_STRINGS_BOUND:
            raise InvalidRequest(f"stop takes at most {STOP_STRINGS_BOUND} strings", field="stop")
        if self.seed is not None:
            _int_in("seed", self.seed, 0, SEED_MAX)
        if not isinstance(self.stop_token_ids, tuple) or len(self.stop_token_ids) > (
            STOP_TOKEN_IDS_BOUND
        ):
            raise InvalidRequest(
                f"stop_token_ids takes at most {STOP_TOKEN_IDS_BOUND} token ids",
                field="stop_token_ids",
            )
        for token in self.stop_token_ids:
            _int_in("stop_token_ids", token, 0, TOKEN_ID_MAX)
        _int_in("min_tokens", self.min_tokens, 0, self.max_tokens)
        _float_in("presence_penalty", self.presence_penalty, -PENALTY_MAX, PENALTY_MAX)
        _float_in("frequency_penalty", self.frequency_penalty, -PENALTY_MAX, PENALTY_MAX)
        rp = self.repetition_penalty
        if not (_is_number(rp) and 0.0 < rp <= REPETITION_PENALTY_MAX):
            raise InvalidRequest(
                f"repetition_penalty must be in (0, {REPETITION_PENALTY_MAX:g}]",
                field="repetition_penalty",
            )
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest("ignore_eos must be true or false", field="ignore_eos")
        if self.logprobs is not None:
            _int_in("logprobs", self.logprobs, 0, TOP_LOGPROBS_MAX)
        if self.prompt_logprobs is not None:
            _int_in("prompt_logprobs", self.prompt_logprobs, 0, TOP_LOGPROBS_MAX)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidRequest("structured must be a StructuredOutput", field="response_format")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether any penalty changes the logits."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(field: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{field} must be an integer between {low} and {high}", field=field)


def _float_in(field: str, value: object, low: float, high: float) -> None:
    if not (_is_number(value) and low <= value <= high):  # type: ignore[operator]
        raise InvalidRequest(f"{field} must be between {low:g} and {high:g}", field=field)
