"""What a generation request may ask for: the one definition of every field's bounds.

The gateway checks each request against :class:`RequestBounds` (the cluster's configured
limits); the intrinsic rules of the decoding fields are
:class:`~vajra.policies.decoding.SamplingParams`'s own; the HTTP schemas take their
``ge``/``le`` numbers from the constants here, so the OpenAPI document and the gateway agree; the client SDK checks what it can before sending.

Every refusal is an :class:`~vajra.errors.InvalidRequest` naming the offending field.
Pure code: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from vajra.errors import InvalidRequest

# The intrinsic bounds of the decoding fields live with SamplingParams; re-exported here so
# that every bound a schema needs comes from this one module.
from vajra.policies.decoding import (
    MAX_TOKENS_BOUND,
    SEED_MAX,
    STOP_STRINGS_BOUND,
    TEMPERATURE_MAX,
    SamplingParams,
)

#: Identifiers (request ids, adapter references, tenant names) are 1..ID_MAX_CHARS characters.
ID_MAX_CHARS = 128

__all__ = [
    "ID_MAX_CHARS",
    "MAX_TOKENS_BOUND",
    "SEED_MAX",
    "STOP_STRINGS_BOUND",
    "TEMPERATURE_MAX",
    "RequestBounds",
    "check_deadline",
    "check_id",
    "check_prompt",
    "check_sampling",
]


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


def check_sampling(params: SamplingParams, bounds: RequestBounds) -> None:
    """The cluster's limits on a request's decoding; the intrinsic rules already held when
    ``params`` was built."""
    if params.max_tokens > bounds.max_tokens_limit:
        raise InvalidRequest(
            f"max_tokens must be between 1 and {bounds.max_tokens_limit}", field="max_tokens"
        )
    if len(params.stop) > bounds.max_stop_strings or any(
        len(s) > bounds.max_stop_chars for s in params.stop
    ):
        raise InvalidRequest(
            f"stop takes at most {bounds.max_stop_strings} non-empty strings of at most "
            f"{bounds.max_stop_chars} characters",
            field="stop",
        )


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
