"""The null engine: no model, no compute, deterministic replies (bus benchmarks, wire tests).

The null "model" tokenises a prompt as one token per UTF-8 byte (token id ``byte + 1``) and
always says :attr:`NullEngine.REPLY_TEXT` (token id 0), one token per step. Its reply ends
after that first token (as if EOS followed; EOS itself is never sent or counted) with
``"stop"``, so by default every request finishes at once. The decoding fields it can honour
without a model it honours exactly:

* ``max_tokens``: the reply ends with ``"length"`` once it holds that many tokens (checked
  first: ``max_tokens == 1`` ends with ``"length"``);
* ``min_tokens`` and ``ignore_eos`` hold the EOS off: one more token per step until
  ``min_tokens`` tokens exist (then ``"stop"``), or, with ``ignore_eos``, until ``max_tokens``;
* ``stop_token_ids`` holding 0 (its only token) ends the reply after it, once ``min_tokens``
  allow, even with ``ignore_eos``;
* ``logprobs`` / ``prompt_logprobs``: fabricated, deterministic entries (:func:`reply_logprob`,
  :func:`prompt_logprob`), one per new token and one per prompt token on the first output;
* ``structured`` with kind ``regex`` that Python's ``re`` cannot compile is refused with
  ``InvalidRequest(field="response_format")``, as the real engine refuses a bad grammar.

Everything else (temperature, penalties, stop strings, grammars) has nothing to act on.
The last requests admitted are kept in :attr:`NullEngine.admitted`, so tests can check what
reached the engine.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from vajra.errors import InvalidRequest
from vajra.gpu.interface import AdapterResidency, GenerationRequest, StepOutput, TokenLogprob

#: How many admitted requests :attr:`NullEngine.admitted` remembers.
ADMITTED_KEPT = 256


def token_text(token_id: int) -> str:
    """The null vocabulary: 0 is ``"."``, ``b + 1`` is byte ``b`` (U+FFFD past ASCII)."""
    if token_id == 0:
        return NullEngine.REPLY_TEXT
    return chr(token_id - 1) if token_id <= 128 else "\ufffd"


def _top(token_id: int, logprob: float, k: int) -> tuple[tuple[int, str, float], ...]:
    """``k`` alternatives, most likely first: the token itself, then ``a``, ``b``, ... each
    one nat less likely than the one before."""
    ids = [token_id] + [t for t in range(ord("a") + 1, ord("a") + 1 + k) if t != token_id]
    return tuple((t, token_text(t), logprob - i) for i, t in enumerate(ids[:k]))


def reply_logprob(position: int, k: int) -> TokenLogprob:
    """The entry of the reply's token at ``position`` (0-based): logprob ``-0.25 * (position
    + 1)``, and ``k`` alternatives."""
    logprob = -0.25 * (position + 1)
    return TokenLogprob(0, NullEngine.REPLY_TEXT, logprob, _top(0, logprob, k))


def prompt_logprob(token_id: int, position: int, k: int) -> TokenLogprob:
    """The entry of the prompt's token at ``position``: None for the first (nothing precedes
    it), else ``-1 - (token_id % 10) / 10``, and ``k`` alternatives."""
    if position == 0:
        return TokenLogprob(token_id, token_text(token_id), None)
    logprob = -1.0 - (token_id % 10) / 10
    return TokenLogprob(token_id, token_text(token_id), logprob, _top(token_id, logprob, k))


@dataclass(slots=True)
class _Row:
    request: GenerationRequest
    prompt_ids: list[int]
    produced: int = 0


class NullEngine:
    """No model and no compute: the replies described in the module docstring."""

    REPLY_TEXT = "."
    REPLY_TOKEN_ID = 0

    def __init__(
        self,
        *,
        device: str | None = None,
        dtype: str = "auto",
        max_batch_size: int = 32,
        max_model_len: int = 2048,
    ) -> None:
        self.model_name = "null"
        self.device = "cpu"
        self.blocking = False  # no compute: stepping inline is cheaper than a thread hop
        self.adapters: AdapterResidency | None = None  # serves no adapters
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.admitted: deque[GenerationRequest] = deque(maxlen=ADMITTED_KEPT)
        self._rows: dict[str, _Row] = {}

    def step(self, admit: Sequence[GenerationRequest], abort: Sequence[str]) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for rid in abort:
            row = self._rows.pop(rid, None)
            if row is not None:
                outputs.append(self._output(row, "", (), "abort"))
        for request in admit:
            self.admitted.append(request)
            refused = _refusal(request)
            if refused is not None:
                outputs.append(refused)
                continue
            self._rows[request.request_id] = _Row(request, [b + 1 for b in request.prompt.encode()])
        for rid, row in list(self._rows.items()):
            outputs.append(self._next_token(row))
            if outputs[-1].finished:
                del self._rows[rid]
        return outputs

    def _next_token(self, row: _Row) -> StepOutput:
        params = row.request.params
        row.produced += 1
        reason: str | None = None
        if row.produced >= params.max_tokens:
            reason = "length"
        elif row.produced >= params.min_tokens and (
            not params.ignore_eos or self.REPLY_TOKEN_ID in params.stop_token_ids
        ):
            reason = "stop"
        logprobs: tuple[TokenLogprob, ...] = ()
        if params.logprobs is not None:
            logprobs = (reply_logprob(row.produced - 1, params.logprobs),)
        prompt_logprobs = None
        if row.produced == 1 and params.prompt_logprobs is not None:
            k = params.prompt_logprobs
            prompt_logprobs = tuple(prompt_logprob(t, i, k) for i, t in enumerate(row.prompt_ids))
        return self._output(
            row, self.REPLY_TEXT, (self.REPLY_TOKEN_ID,), reason, logprobs, prompt_logprobs
        )

    @staticmethod
    def _output(
        row: _Row,
        text: str,
        token_ids: tuple[int, ...],
        reason: str | None,
        logprobs: tuple[TokenLogprob, ...] = (),
        prompt_logprobs: tuple[TokenLogprob, ...] | None = None,
    ) -> StepOutput:
        return StepOutput(
            request_id=row.request.request_id,
            text_delta=text,
            token_ids=token_ids,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=row.produced,
            compute_ms=0.0,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def num_running(self) -> int:
        return len(self._rows)

    def num_waiting(self) -> int:
        return 0

    def has_work(self) -> bool:
        return bool(self._rows)


def _refusal(request: GenerationRequest) -> StepOutput | None:
    """A finished error output for a request the null engine cannot run, else None."""
    structured = request.params.structured
    if structured is None or structured.kind != "regex":
        return None
    try:
        re.compile(structured.spec)
    except (re.error, RecursionError, OverflowError) as exc:
        error = InvalidRequest(f"the regex does not compile: {exc}", field="response_format")
    else:
        return None
    return StepOutput(
        request_id=request.request_id,
        text_delta="",
        token_ids=(),
        finished=True,
        finish_reason="error",
        prompt_tokens=0,
        completion_tokens=0,
        compute_ms=0.0,
        error=error,
    )
