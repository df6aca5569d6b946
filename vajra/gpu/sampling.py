"""Per-request sampling parameters and the pure function that picks each row's next token.

Semantics: for row ``i`` of ``logits`` with parameters ``p = params[i]``

- ``p.temperature == 0``: ``argmax(logits[i])`` (greedy; ``top_p`` and ``seed`` are ignored);
- otherwise: ``softmax(logits[i] / p.temperature)``, keep the smallest set of most likely tokens
  whose mass reaches ``p.top_p`` (always at least one), renormalise, draw with ``generators[i]``.

Each request draws from its own ``torch.Generator``, so a seeded request gets the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vajra.errors import InvalidRequest


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. Raises :class:`InvalidRequest` naming the bad field."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", field="max_tokens")
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise InvalidRequest("temperature must be a finite number >= 0", field="temperature")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest("top_p must be in (0, 1]", field="top_p")
        if any(not s for s in self.stop):
            raise InvalidRequest("stop strings must not be empty", field="stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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


def sample_next_tokens(
    logits: torch.Tensor,  # [batch, vocab]
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:  # [batch] int64, on logits.device
    """Pick one token per row (see the module docstring for the semantics)."""
    tokens = logits.argmax(dim=-1)
    for row, p in enumerate(params):
        if not p.greedy:
            tokens[row] = sample_row(logits[row], p.temperature, p.top_p, generators[row])
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
