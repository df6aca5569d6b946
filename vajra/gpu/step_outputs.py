"""The finished outputs of requests that end without a new token: refused, aborted, failed."""

from __future__ import annotations

from vajra.errors import InternalError, VajraError
from vajra.gpu.interface import StepOutput
from vajra.gpu.step_planner import Sequence


def refusal(request_id: str, error: VajraError, *, prompt_tokens: int = 0) -> StepOutput:
    return StepOutput(
        request_id=request_id,
        text_delta="",
        token_ids=(),
        finished=True,
        finish_reason="error",
        prompt_tokens=prompt_tokens,
        completion_tokens=0,
        compute_ms=0.0,
        error=error,
    )


def ended(seq: Sequence, reason: str, error: VajraError | None = None) -> StepOutput:
    """The final output of a request that ends without a new token (an abort or an error),
    with what it computed so far."""
    return StepOutput(
        request_id=seq.request_id,
        text_delta="",
        token_ids=(),
        finished=True,
        finish_reason=reason,
        prompt_tokens=seq.prompt_len,
        completion_tokens=seq.completion_tokens,
        compute_ms=seq.compute_ms,
        error=error,
    )


def error_output(seq: Sequence, exc: Exception) -> StepOutput:
    return ended(seq, "error", InternalError(f"model step failed: {type(exc).__name__}: {exc}"))
