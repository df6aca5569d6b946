"""Log-probabilities as OpenAI reports them: each chosen token's, and each prompt token's (echo).

Both come from ``log_softmax`` of the logits after the request's penalties and before any mask
or temperature (:mod:`vajra.policies.decoding`); ``top`` holds the ``k`` most likely tokens of
the position, most likely first. A logprob of -inf (a token the model rules out) is reported as
:data:`LOGPROB_FLOOR`, since JSON has no infinity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

import vajra.gpu.interface as _interface  # the module, not its names: interface imports sampling

if TYPE_CHECKING:
    from vajra.gpu.interface import TokenLogprob

#: What a logprob of -inf is reported as.
LOGPROB_FLOOR = -9999.0
#: Prompt positions whose log-softmax is computed at once (bounds the temporary memory).
_PROMPT_CHUNK_ROWS = 256


def token_logprob(
    token_id: int,
    logprob: float | None,
    top_ids: Sequence[float],
    top_logprobs: Sequence[float],
    token_text: Callable[[int], str],
) -> TokenLogprob:
    """One position's entry from host numbers (ids may arrive as floats from a packed copy)."""
    top = tuple(
        (int(t), token_text(int(t)), max(float(lp), LOGPROB_FLOOR))
        for t, lp in zip(top_ids, top_logprobs, strict=True)
    )
    value = None if logprob is None else max(float(logprob), LOGPROB_FLOOR)
    return _interface.TokenLogprob(token_id, token_text(token_id), value, top)


def prompt_logprobs(
    logits: torch.Tensor,  # [n, V]: the model's output at prompt positions start .. start+n-1
    prompt_ids: Sequence[int],
    k: int,
    token_text: Callable[[int], str],
    *,
    start: int = 0,
) -> tuple[TokenLogprob, ...]:
    """The prompt's entries with OpenAI echo semantics: token ``i``'s logprob comes from the
    logits at position ``i - 1``, so the first prompt token's logprob is None.

    Returns the entries of prompt tokens ``start + 1 .. start + n`` (those that exist), after
    token 0's (logprob None, no alternatives) when ``start == 0``: the results of successive
    chunks of one prompt's prefill concatenate to the whole prompt's. One device-to-host copy.
    """
    entries: list[TokenLogprob] = []
    if start == 0 and prompt_ids:
        entries.append(token_logprob(int(prompt_ids[0]), None, (), (), token_text))
    rows = max(0, min(logits.shape[0], len(prompt_ids) - start - 1))
    if rows == 0:
        return tuple(entries)
    targets = [int(t) for t in prompt_ids[start + 1 : start + 1 + rows]]
    pin = logits.device.type == "cuda"
    index = torch.tensor(targets, dtype=torch.long, pin_memory=pin).to(
        logits.device, non_blocking=True
    )
    k = min(k, logits.shape[1])
    chunks = []  # [m, 1 + 2k] float64 each: logprob, top ids, top logprobs
    for a in range(0, rows, _PROMPT_CHUNK_ROWS):
        b = min(rows, a + _PROMPT_CHUNK_ROWS)
        lp = torch.log_softmax(logits[a:b].float(), dim=-1)
        columns = [lp.gather(1, index[a:b, None]).double()]
        if k > 0:
            top = lp.topk(k, dim=-1)
            columns += [top.indices.double(), top.values.double()]
        chunks.append(torch.cat(columns, dim=1))
    host = torch.cat(chunks).cpu().tolist()
    for target, row in zip(targets, host, strict=True):
        entries.append(token_logprob(target, row[0], row[1 : 1 + k], row[1 + k :], token_text))
    return tuple(entries)
