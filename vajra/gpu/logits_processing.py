"""The batched tensor steps of sampling: penalties, masks, truncation and the draw.

Pure functions over device tensors, each vectorised over rows and free of device
synchronisation (no ``.item()``, no boolean indexing, no host-side shapes that depend on
values). :mod:`vajra.gpu.sampling` composes them in the order that
:mod:`vajra.policies.decoding` defines. Shapes: ``n`` rows, ``V`` the vocabulary.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_repetition_penalty(
    logits: torch.Tensor,  # [n, V] float32, changed in place
    rows: torch.Tensor,  # [m] int64
    tokens: torch.Tensor,  # [m] int64
    penalty: torch.Tensor,  # [m] float32
) -> None:
    """Semantics: ``l = l / r if l > 0 else l * r`` at each ``(row, token)``. A pair may repeat
    (a token of both prompt and completion): every copy computes from the original logit, so
    the repeats write the same value."""
    values = logits[rows, tokens]
    logits.index_put_((rows, tokens), torch.where(values > 0, values / penalty, values * penalty))


def apply_count_penalties(
    logits: torch.Tensor,  # [n, V] float32, changed in place
    rows: torch.Tensor,  # [m] int64; (row, token) pairs are distinct
    tokens: torch.Tensor,  # [m] int64
    counts: torch.Tensor,  # [m] float32 > 0: the token's count in the row's completion
    presence: torch.Tensor,  # [m] float32
    frequency: torch.Tensor,  # [m] float32
) -> None:
    """Semantics: ``l -= presence + frequency * count`` at each ``(row, token)`` (OpenAI's)."""
    values = logits[rows, tokens]
    logits.index_put_((rows, tokens), values - presence - frequency * counts)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, W] int32 (bit ``t % 32`` of word ``t // 32``: token ``t`` allowed) -> [n, V] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1  # [n, W, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def nucleus_threshold(
    sorted_logits: torch.Tensor,  # [n, K] each row in descending order (-inf allowed)
    top_p: torch.Tensor,  # [n] in (0, 1]
) -> torch.Tensor:  # [n]
    """The smallest logit of each row's nucleus: the most likely tokens whose mass (softmax over
    the K given) first reaches ``top_p`` (always at least the first)."""
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    last = ((mass_before < top_p[:, None]).sum(dim=-1) - 1).clamp(min=0)
    return sorted_logits.gather(1, last[:, None]).squeeze(1)


def truncation_threshold(
    scaled: torch.Tensor,  # [n, V] logits / temperature
    top_k: torch.Tensor,  # [n] int64, 0 = off
    top_p: torch.Tensor,  # [n] float32, 1 = off
    k_rows: torch.Tensor | None,  # [nk] int64: the rows with top_k > 0 (None: no such row)
    k_max: int,  # the largest top_k of those rows
    p_rows: torch.Tensor | None,  # [np] int64: rows with top_k == 0 and top_p < 1
) -> torch.Tensor:  # [n], -inf where nothing is cut
    """Each row keeps the tokens whose scaled logit is at least the returned value: the
    ``top_k`` most likely, then of those the nucleus of mass ``top_p`` (renormalised over the
    ``top_k``). Tokens tied with the last one kept are kept too.

    Only rows with ``top_k > 0`` pay for a ``topk`` of width ``k_max``; only rows with
    ``top_p < 1`` and no ``top_k`` pay for a full sort."""
    threshold = torch.full((scaled.shape[0],), NEG_INF, device=scaled.device)
    if k_rows is not None:
        values = scaled[k_rows].topk(k_max, dim=-1).values  # [nk, k_max] descending
        k = top_k[k_rows]
        kth = values.gather(1, (k - 1)[:, None]).squeeze(1)
        positions = torch.arange(k_max, device=scaled.device)
        values = values.masked_fill(positions[None, :] >= k[:, None], NEG_INF)
        p = top_p[k_rows]
        nucleus = torch.where(p < 1.0, nucleus_threshold(values, p), NEG_INF)
        threshold[k_rows] = torch.maximum(kth, nucleus)
    if p_rows is not None:
        values = scaled[p_rows].sort(dim=-1, descending=True).values
        threshold[p_rows] = nucleus_threshold(values, top_p[p_rows])
    return threshold


def inverse_cdf_draw(
    logits: torch.Tensor,  # [n, V] float32, -inf where a token may not be drawn
    uniform: torch.Tensor,  # [n] float64 in [0, 1): one draw of each row's own generator
) -> torch.Tensor:  # [n] int64
    """Draw from ``softmax(logits)`` by inverting its CDF in vocabulary order at ``uniform``.

    Each row uses exactly one number of its own stream, so a row's token does not depend on
    what else is in the batch, and never a token of probability 0."""
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    below_total = torch.nextafter(total, torch.zeros_like(total))
    target = torch.minimum(uniform[:, None] * total, below_total)
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return index.clamp_(max=logits.shape[1] - 1)
