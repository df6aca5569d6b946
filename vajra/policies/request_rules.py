"""What a generation request may ask for: the one definition of every field's bounds.

The gateway checks each request against :class:`RequestBounds` (the cluster's configured
limits); the engine's ``SamplingParams`` applies :func:`check_sampling` with no configured
limits; the HTTP schemas take their ``ge``/``le`` numbers from the constants here, so the
OpenAPI document and the gateway agree; the client SDK checks what it can before sending.

Every refusal is an :class:`~vajra.errors.InvalidRequest` naming the offending field.
Pure code: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from vajra.errors import InvalidRequest

#: Identifiers (request ids, adapter references, tenant names) are 1..ID_MAX_CHARS characters.
ID_MAX_CHARS = 128
#: ``seed`` is an unsigned 63-bit integer (a torch generator's seed range).
SEED_MAX = 2**63 - 1
#: ``temperature`` is in [0, TEMPERATURE_MAX]; 0 is greedy.
TEMPERATURE_MAX = 5.0
#: The largest ``max_tokens`` any schema accepts; a cluster's configured limit is lower.
MAX_TOKENS_BOUND = 1_000_000
#: The most stop strings any schema accepts; a cluster's configured limit may be lower.
STOP_STRINGS_BOUND = 8


@dataclass(frozen=True, slots=True)
class RequestBounds:
    """A cluster's configured limits (``[gateway]`` in ``config/vajra.toml``)."""

    max_prompt_chars: int = 32_768
    max_tokens_limit: int = 4_096
    max_stop_strings: int = STOP_STRINGS_BOUND
    max_stop_chars: int = 128
    max_deadline_ms: int = 600_000


def check_id(value: str, field: str) -> None:
    """``value`` is 1..ID_MAX_CHARS characters."""
    if not value or len(value) > ID_MAX_CHARS:
        raise InvalidRequest(f"{field} must be 1..{ID_MAX_CHARS} characters", field=field)


def check_sampling(
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    stop: Sequence[str],
    seed: int | None,
    bounds: RequestBounds | None = None,
) -> None:
    """The decoding parameters of one request; ``bounds`` None: only the intrinsic rules."""
    max_tokens_limit = MAX_TOKENS_BOUND if bounds is None else bounds.max_tokens_limit
    if isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens must be between 1 and {max_tokens_limit}", field="max_tokens"
        )
    if not (math.isfinite(temperature) and 0.0 <= temperature <= TEMPERATURE_MAX):
        raise InvalidRequest(
            f"temperature must be between 0 and {TEMPERATURE_MAX:g}", field="temperature"
        )
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidRequest("top_p must be in (0, 1]", field="top_p")
    if any(not s for s in stop):
        raise InvalidRequest("stop strings must not be empty", field="stop")
    if bounds is not None and (
        len(stop) > bounds.max_stop_strings or any(len(s) > bounds.max_stop_chars for s in stop)
    ):
        raise InvalidRequest(
            f"stop takes at most {bounds.max_stop_strings} non-empty strings of at most "
            f"{bounds.max_stop_chars} characters",
            field="stop",
        )
    if seed is not None and (isinstance(seed, bool) or not 0 <= seed <= SEED_MAX):
        raise InvalidRequest("seed must be between 0 and 2**63-1", field="seed")


def check_prompt(prompt: str, bounds: RequestBounds) -> None:
    """A non-empty prompt within the cluster's character limit."""
    if not prompt:
        raise InvalidRequest("prompt must not be empty", field="prompt")
    if len(prompt) > bounds.max_prompt_chars:
        raise InvalidRequest(
            f"prompt has {len(prompt)} characters; the limit is {bounds.max_prompt_chars}",
            field="prompt",
        )


def check_deadline(deadline_ms: int, bounds: RequestBounds) -> None:
    """How long the client will wait, within the cluster's limit."""
    if isinstance(deadline_ms, bool) or not 1 <= deadline_ms <= bounds.max_deadline_ms:
        raise InvalidRequest(
            f"deadline_ms must be between 1 and {bounds.max_deadline_ms}", field="deadline_ms"
        )
