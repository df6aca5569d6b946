"""How one packed batch's tokens map to adapters: small pure functions over host lists.

A *segment* is ``(start, length, slot)``: the packed tokens ``start .. start + length - 1``
use the adapter in pool slot ``slot`` (None: the base model alone). Segments are given in
token order and do not overlap; tokens no segment covers get no LoRA delta.

The batch splits into *gather tokens* (short segments: a decode step's one token each,
computed token by token with each token's adapter, BGMV-style) and *long segments* (prefill
chunks, computed with one matmul pair per segment on the adapter's rows, SGMV-style). The
torch path lays gather tokens out either by rank bucket (:func:`gather_buckets`) or as the rows
of one sparse matrix per module kind (:func:`csr_rows`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Segment = tuple[int, int, int | None]  # (first token, number of tokens, slot or None)
GatherToken = tuple[int, int]  # (token, slot)
LongSegment = tuple[int, int, int]  # (first token, number of tokens, slot)


def split_segments(
    segments: Sequence[Segment], num_tokens: int, *, gather_max_tokens: int
) -> tuple[list[GatherToken], list[LongSegment]]:
    """Check ``segments`` against a batch of ``num_tokens`` tokens and split them: segments
    of at most ``gather_max_tokens`` tokens become gather tokens, the rest long segments (a
    long segment right after one of the same slot extends it). Segments without a slot are
    dropped. Raises ValueError for segments out of order, overlapping, empty or outside the
    batch."""
    gather: list[GatherToken] = []
    long: list[LongSegment] = []
    end = 0
    for start, length, slot in segments:
        if length < 1 or start < end or start + length > num_tokens:
            raise ValueError(
                f"segment ({start}, {length}) is empty, out of order, overlaps the one before "
                f"or lies outside the batch of {num_tokens} tokens"
            )
        end = start + length
        if slot is None:
            continue
        if length <= gather_max_tokens:
            gather += [(t, slot) for t in range(start, end)]
        elif long and long[-1][2] == slot and sum(long[-1][:2]) == start:
            long[-1] = (long[-1][0], long[-1][1] + length, slot)
        else:
            long.append((start, length, slot))
    return gather, long


def row_segments(slots: Sequence[int | None], tokens_per_row: int) -> list[Segment]:
    """A ``[rows, tokens]`` batch flattened row after row: row ``i`` is one segment."""
    return [(i * tokens_per_row, tokens_per_row, slot) for i, slot in enumerate(slots)]


def rank_bucket(rank: int) -> int:
    """The power of two at least ``rank``: the width a gather computes for that rank."""
    return 1 << max(0, rank - 1).bit_length()


def gather_buckets(
    gather: Sequence[GatherToken], rank_of: Mapping[int, int]
) -> list[tuple[int, list[int], list[int]]]:
    """Gather tokens grouped by the rank bucket of their adapter (``rank_of[slot]``; 0: the
    adapter does not apply, the token is left out): ``(bucket, tokens, slots)`` per bucket,
    smallest bucket first. Each bucket is one batched matmul pair as wide as its bucket, so
    a rank-4 token never computes 64 rows because a rank-64 token shares the batch."""
    buckets: dict[int, tuple[list[int], list[int]]] = {}
    for token, slot in gather:
        rank = rank_of[slot]
        if rank:
            tokens, slots = buckets.setdefault(rank_bucket(rank), ([], []))
            tokens.append(token)
            slots.append(slot)
    return [(width, *buckets[width]) for width in sorted(buckets)]


def csr_rows(
    gather: Sequence[GatherToken], rank_of: Mapping[int, int]
) -> tuple[int, int, list[int], list[int]]:
    """Gather tokens as the rows of a CSR matrix, for one module kind: ``(lo, hi, slots,
    ranks)``, a row per token ``lo .. hi - 1``.

    ``lo`` and ``hi`` bound the tokens that have entries (the first, and one past the last,
    gather token whose adapter has a nonzero ``rank_of[slot]``); row ``t - lo`` is token
    ``t``'s: its slot and its adapter's exact rank for the kind (its number of entries, one
    per rank row, no padding). Tokens in that span that are not gather tokens, or whose
    adapter does not target the kind, get ``(0, 0)``: an empty row. No gather token with a
    rank: ``(0, 0, [], [])``.

    Raises ValueError for gather tokens not in increasing order.
    """
    ranked: dict[int, tuple[int, int]] = {}
    last = -1
    for token, slot in gather:
        if token <= last:
            raise ValueError(f"gather token {token} is not after token {last}")
        last = token
        rank = rank_of[slot]
        if rank:
            ranked[token] = (slot, rank)
    if not ranked:
        return 0, 0, [], []
    lo, hi = min(ranked), max(ranked) + 1
    if len(ranked) == hi - lo:  # the usual case: a step's decode tokens side by side
        rows = list(ranked.values())
    else:
        rows = [ranked.get(token, (0, 0)) for token in range(lo, hi)]
    return lo, hi, [slot for slot, _ in rows], [rank for _, rank in rows]


def segment_blocks(long: Sequence[LongSegment], block_tokens: int) -> list[LongSegment]:
    """Long segments cut into blocks of at most ``block_tokens`` tokens (one kernel program
    each), in order."""
    return [
        (start + first, min(block_tokens, length - first), slot)
        for start, length, slot in long
        for first in range(0, length, block_tokens)
    ]
