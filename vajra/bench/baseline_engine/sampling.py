"""The baseline engine's sampling: the pure function that picks each row's next token.

A copy of ``vajra.gpu.sampling`` before the paged-KV rewrite (``SamplingParams`` here is only
the protocol of what it reads).

Semantics: for row ``i`` of ``logits`` with parameters ``p = params[i]``

- ``p.temperature == 0``: ``argmax(logits[i])`` (greedy; ``top_p`` and ``seed`` are ignored);
- otherwise: ``softmax(logits[i] / p.temperature)``, keep the smallest set of most likely tokens
  whose mass reaches ``p.top_p`` (always at least one), renormalise, draw with ``generators[i]``.

Each request draws from its own ``torch.Generator``, so a seeded request gets the same tokens
whatever else shares its batch.

A row whose logits cannot be sampled (a NaN or +inf anywhere, or every entry -inf: e.g. an
adapter with corrupt weights) gets the token :data:`BAD_ROW` instead, and so does a row whose
sampling raised; the other rows are unaffected. Sampling never raises for a bad row: the
engine ends that row alone with an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class SamplingParams(Protocol):
    """What sampling reads of a request's parameters (``vajra.gpu.sampling.SamplingParams``)."""

    @property
    def temperature(self) -> float: ...

    @property
    def top_p(self) -> float: ...

    @property
    def seed(self) -> int | None: ...

    @property
    def greedy(self) -> bool: ...


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """The request's own random stream: ``None`` for greedy, seeded from ``params.seed`` if set."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


#: The token :func:`sample_next_tokens` gives a row it cannot sample.
BAD_ROW = -1


def unsampleable_rows(logits: torch.Tensor) -> torch.Tensor:  # [batch] bool
    """Rows with a NaN or +inf logit, or with every logit -inf."""
    return (
        torch.isnan(logits).any(dim=-1)
        | torch.isposinf(logits).any(dim=-1)
        | torch.isneginf(logits).all(dim=-1)
    )


def sample_next_tokens(
    logits: torch.Tensor,  # [batch, vocab]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:  # [batch] int64, on logits.device; BAD_ROW for a row that cannot be sampled
    """Pick one token per row (see the module docstring for the semantics); never raises
    because of one row's logits."""
    bad = unsampleable_rows(logits)
    tokens = logits.argmax(dim=-1)
    bad_rows = set(bad.nonzero().flatten().tolist()) if bool(bad.any()) else set()
    for row, p in enumerate(params):
        if row in bad_rows or p.greedy:
            continue
        try:
            tokens[row] = sample_row(logits[row], p.temperature, p.top_p, generators[row])
        except RuntimeError:  # e.g. probabilities that do not sum to a positive number
            bad_rows.add(row)
    if bad_rows:
        tokens[sorted(bad_rows)] = BAD_ROW
    return tokens


def sample_row(
    logits: torch.Tensor,  # [vocab]
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:  # [1] int64
    """Temperature + nucleus sampling of one row."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # keeps index 0 always
    return order[torch.multinomial(sorted_probs, 1, generator=generator)]
