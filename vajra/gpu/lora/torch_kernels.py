"""The torch path of the multi-LoRA layer: the semantics of :mod:`vajra.gpu.lora.layer` in
plain torch ops, for the CPU (and CUDA without Triton). ``x``/``y`` are a batch's packed tokens,
``[tokens, in]`` / ``[tokens, out]``; ``a``/``bt`` one module's page views of the pool,
``[pages, in]`` / ``[pages, out]``.

Decode tokens of more than a few distinct adapters (the others go per adapter,
:func:`lora_tokens`) are computed one of three ways, all tokens of a step per module at once:

* :func:`lora_csr` (CPU, float32/float64): one sparse matrix per module kind, a row per
  token and an entry per rank row of its adapter (the entry's column is its page). The shrink
  computes every token's dot products with its adapter's ``A`` rows in one sampled matmul
  against the pool's ``A`` view, and the expand multiplies the sparse matrix of those
  products by the pool's ``Bt`` view in place: exact ranks, no padding, and both read the
  pages' rows where they lie (the views are contiguous, so nothing is copied). Two torch
  calls per module, whatever the adapters.
* :func:`lora_union`: every token against every rank row of the step's adapters, one dense
  matmul each way, masked to the token's own adapter: cheaper than CSR when few adapters
  share many tokens. :class:`TorchPlanner` picks between these two per kind by a cost
  estimate (:data:`UNION_MAX_RATIO`).
* :func:`lora_bgmv` (other devices and dtypes): each rank bucket's ``A`` and ``Bt`` rows
  gathered into ``[n, width, in]`` / ``[n, width, out]`` and two batched matmuls.

What they cost per module on the 2-core development machine (one torch thread, float32, a
64 x 64 projection whose rows of 256 floats lie in an arena of 16,385 pages, as the tiny
model's q_proj; 32 tokens of distinct adapters of ranks 8/16/32/64, 960 rank rows; best of 7
rounds of a micro-benchmark): four rank buckets gathered with
``a[pages]`` and ``bmm`` (the kernel before this one) 219 us, the same gathered with
``index_select`` 111 us, CSR 41 us when it still gathered the ``A`` rows first (the pool's
views were strided then). With contiguous views and no gather, all 14 modules of a 32-token
step of 32 adapters take 0.51 ms against 1.09 ms (warm caches; 0.75 against 1.34 ms after a
64 MiB write in between).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal, NamedTuple

import torch

from vajra.gpu.lora.pool import LoraPool
from vajra.gpu.lora.segments import (
    GatherToken,
    LongSegment,
    csr_rows,
    gather_buckets,
    rank_bucket,
)

#: How gather tokens of many adapters are computed (see :class:`TorchPlanner`).
GatherKernel = Literal["cost", "csr", "union", "bmm"]

#: "cost" takes the union kernel when its dense work, rows x the adapters' summed rank, is at
#: most this many times the CSR kernel's entries. Measured per module (tiny model, 32 tokens of
#: rank 16, one thread): union 14 / 15 / 20 / 29 / 48 us against CSR 29 us with 3 / 4 / 8 /
#: 16 / 32 distinct adapters, i.e. a ratio of 3 / 4 / 8 / 16 / 32.
UNION_MAX_RATIO = 8


class _Part(NamedTuple):
    """Where one gather layout (shared by the kinds whose adapters' ranks agree) lies in the
    step's index data, and how it is computed."""

    how: Literal["csr", "union", "bucket"]
    offset: int
    first: int  # csr, union: first token row; bucket: its width
    second: int  # csr, union: one past the last token row; bucket: its number of tokens
    size: int = 0  # csr: entries; union: columns (the adapters' summed rank)
    adapters: int = 0  # union: distinct adapters


@dataclass(eq=False)
class KindWork:
    """What the torch path computes this step for the modules of one kind."""

    # per rank bucket: (tokens [n], their adapters' pages [n, width])
    gathers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # or every gather token at once: (lo, hi, CSR [hi - lo, arena pages], an entry per rank
    # row of the token's adapter, its column the row's page)
    csr: tuple[int, int, torch.Tensor] | None = None
    # or: (lo, hi, each row's own columns [hi - lo, cols] (1/0), each column's page [cols])
    union: tuple[int, int, torch.Tensor, torch.Tensor] | None = None
    # per adapter, with few adapters: (its gather tokens [n], its pages: a slice or an index [r])
    groups: list[tuple[torch.Tensor, slice | torch.Tensor]] = field(default_factory=list)
    # per long segment: (first token, end, the adapter's pages: a slice or an index [r])
    segments: list[tuple[int, int, slice | torch.Tensor]] = field(default_factory=list)

    def apply(self, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor) -> None:
        """One module's deltas: ``x`` [tokens, in], ``y`` [tokens, out] (in place), ``a`` /
        ``bt`` its page views of the pool."""
        if self.csr is not None:
            lora_csr(x, y, *self.csr, a, bt)
        if self.union is not None:
            lora_union(x, y, *self.union, a, bt)
        for tokens, pages in self.gathers:
            lora_bgmv(x, y, tokens, pages, a, bt)
        for tokens, rows in self.groups:
            lora_tokens(x, y, tokens, adapter_rows(a, rows), adapter_rows(bt, rows))
        for start, end, rows in self.segments:
            lora_sgmv(x, y, start, end, adapter_rows(a, rows), adapter_rows(bt, rows))


class TorchPlanner:
    """Lays one step out for the torch path: a :class:`KindWork` per module kind.

    ``gather_kernel`` picks how gather tokens of more than ``max_groups`` adapters are
    computed: "csr" (:func:`lora_csr`; CPU, float32/float64 only), "union"
    (:func:`lora_union`), "cost" (per kind, union when :data:`UNION_MAX_RATIO` says it is
    cheaper, else CSR; CPU, float32/float64 only) or "bmm" (rank buckets, :func:`lora_bgmv`).
    Owns the small device buffers the CSR kernel's shrink pattern reads.
    """

    def __init__(self, pool: LoraPool, gather_kernel: GatherKernel) -> None:
        self.pool = pool
        self.gather_kernel = gather_kernel
        self._ones = torch.zeros(0, dtype=pool.dtype, device=pool.device)  # shrink values
        self._rank_rows = torch.arange(pool.max_rank, dtype=torch.int32, device=pool.device)
        if gather_kernel in ("csr", "cost"):
            with warnings.catch_warnings():  # torch warns once per process that CSR is beta
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                no_pages = torch.zeros(0, dtype=torch.int32, device=pool.device)
                self._shrink(torch.zeros(2, dtype=torch.int32, device=pool.device), no_pages, 0)

    def plan(
        self,
        gather: list[GatherToken],
        long: list[LongSegment],
        ranks: dict[int, tuple[int, ...]],
        *,
        max_groups: int,
        upload: Callable[[list[int]], torch.Tensor],
    ) -> list[KindWork]:
        """The step's work per kind. Gather tokens of at most ``max_groups`` distinct
        adapters go per adapter (no weight gather), else by ``gather_kernel``. ``upload``
        copies the host index list to the device in one transfer and returns it (int32).
        Raises ValueError for gather tokens out of order (:func:`csr_rows`)."""
        flat: list[int] = []
        by_slot: dict[int, list[int]] = {}
        for token, slot in gather:
            by_slot.setdefault(slot, []).append(token)
        groups: list[tuple[int, int, int]] = []  # (slot, offset, n)
        if len(by_slot) <= max_groups:
            for slot, slot_tokens in by_slot.items():
                groups.append((slot, len(flat), len(slot_tokens)))
                flat += slot_tokens
            gather = []
        buckets = self.gather_kernel == "bmm"
        columns = list(zip(*ranks.values(), strict=True))  # per kind: each slot's rank
        laid_out: dict[tuple[int, ...], list[_Part]] = {}
        wanted: list[tuple[int, _Part]] = []
        kinds = [KindWork() for _ in self.pool.layout.kinds]
        for kind, work in enumerate(kinds):
            if gather:
                column = columns[kind]
                key = tuple(rank_bucket(r) if r else 0 for r in column) if buckets else column
                parts = laid_out.get(key)
                if parts is None:  # kinds whose adapters' ranks agree share index data
                    rank_of = dict(zip(ranks, column, strict=True))
                    parts = laid_out[key] = self._lay_out(gather, rank_of, flat)
                wanted += [(kind, part) for part in parts]
            for start, length, slot in long:
                if ranks[slot][kind]:
                    work.segments.append((start, start + length, self._pages(slot, kind)))
        index = upload(flat)
        for slot, offset, n in groups:
            for kind, work in enumerate(kinds):
                if ranks[slot][kind]:
                    work.groups.append((index[offset : offset + n], self._pages(slot, kind)))
        built: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # by offset: shared by kinds
        for kind, part in wanted:
            if part.how == "bucket":  # ``second`` tokens, then their slots
                at, n = part.offset, part.second
                slots = index[at + n : at + 2 * n]
                pages = self.pool.page_table[kind].index_select(0, slots)[:, : part.first]
                kinds[kind].gathers.append((index[at : at + n], pages))
                continue
            if part.offset not in built:
                built[part.offset] = self._build(part, index)
            pattern, pages = built[part.offset]
            if part.how == "csr":
                shrink = self._shrink(pattern, pages[kind], kind)
                kinds[kind].csr = (part.first, part.second, shrink)
            else:
                kinds[kind].union = (part.first, part.second, pattern, pages[kind])
        return kinds

    def _lay_out(
        self, gather: list[GatherToken], rank_of: dict[int, int], flat: list[int]
    ) -> list[_Part]:
        """Append one layout's gather index data to ``flat``; return its parts (none if no
        token's adapter has a rank for these kinds)."""
        if self.gather_kernel == "bmm":
            parts = []
            for width, bucket_tokens, bucket_slots in gather_buckets(gather, rank_of):
                parts.append(_Part("bucket", len(flat), width, len(bucket_tokens)))
                flat += bucket_tokens + bucket_slots
            return parts
        lo, hi, row_slots, row_ranks = csr_rows(gather, rank_of)
        if lo == hi:
            return []
        offset = len(flat)
        adapters = {s: r for s, r in zip(row_slots, row_ranks, strict=True) if r}
        width, nnz = sum(adapters.values()), sum(row_ranks)
        how = self.gather_kernel
        if how == "cost":
            how = "union" if (hi - lo) * width <= UNION_MAX_RATIO * nnz else "csr"
        if how == "csr":  # crow [rows + 1], each row's slot, each row's rank
            flat.append(0)
            flat += accumulate(row_ranks)
            flat += row_slots
            flat += row_ranks
            return [_Part("csr", offset, lo, hi, nnz)]
        owner = {s: i for i, s in enumerate(adapters)}  # each row's adapter, each column's
        flat += [owner[s] if r else -1 for s, r in zip(row_slots, row_ranks, strict=True)]
        for i, r in enumerate(adapters.values()):
            flat += [i] * r
        flat += adapters  # the adapters' slots, then their ranks
        flat += adapters.values()
        return [_Part("union", offset, lo, hi, width, len(adapters))]

    def _build(self, part: _Part, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A CSR or union layout's device data: its pattern (the CSR's row offsets, or each
        row's own columns as 1/0) and every kind's pages [kinds, entries or columns]."""
        at, rows = part.offset, part.second - part.first
        if part.how == "csr":
            crow, slots = index[at : at + rows + 1], index[at + rows + 1 :][:rows]
            row_ranks = index[at + 2 * rows + 1 :][:rows]
            return crow, self._table_pages(slots, row_ranks)
        row_owner, col_owner = index[at : at + rows], index[at + rows :][: part.size]
        at += rows + part.size
        slots, slot_ranks = index[at : at + part.adapters], index[at + part.adapters :]
        own = row_owner.unsqueeze(1) == col_owner.unsqueeze(0)  # [rows, columns]
        pages = self._table_pages(slots, slot_ranks[: part.adapters])
        return own.to(self.pool.dtype), pages

    def _shrink(self, crow: torch.Tensor, pages: torch.Tensor, kind: int) -> torch.Tensor:
        """The CSR ``[rows, arena pages]`` with ``crow`` and an entry at each of ``pages``
        (int32, in row order): the pattern :func:`lora_csr` samples (its values, all ones,
        a shared buffer)."""
        nnz = pages.numel()
        if nnz > self._ones.numel():
            self._ones = torch.ones(2 * nnz, dtype=self.pool.dtype, device=self.pool.device)
        shape = (crow.numel() - 1, self.pool.arena_pages(kind))
        return torch.sparse_csr_tensor(crow, pages, self._ones[:nnz], shape, check_invariants=False)

    def _table_pages(self, slots: torch.Tensor, slot_ranks: torch.Tensor) -> torch.Tensor:
        """Every kind's pages of the first ``slot_ranks[i]`` rank rows of each ``slots[i]``,
        in order: [kinds, sum of the ranks] (three small device ops for all kinds)."""
        table = self.pool.page_table  # [kinds, slots, max_rank]
        mask = self._rank_rows.unsqueeze(0) < slot_ranks.unsqueeze(1)
        return table.index_select(1, slots).masked_select(mask).view(table.shape[0], -1)

    def _pages(self, slot: int, kind: int) -> slice | torch.Tensor:
        """The adapter's pages of ``kind``: a slice when they are one run, else its page
        table row (on the device)."""
        rank = self.pool.ranks_of(slot)[kind]
        runs = self.pool.runs(slot, kind)
        if len(runs) == 1:
            return slice(runs[0][0], runs[0][0] + rank)
        return self.pool.page_table[kind, slot, :rank]


def lora_bgmv(
    x: torch.Tensor,  # [tokens, in]
    y: torch.Tensor,  # [tokens, out], updated in place
    tokens: torch.Tensor,  # [n] int: the tokens to compute
    pages: torch.Tensor,  # [n, width] int: each token's adapter's pages (zero page past its rank)
    a: torch.Tensor,  # [pages, in]
    bt: torch.Tensor,  # [pages, out]
) -> None:
    """``y[tokens[i]] += (x[tokens[i]] @ a[pages[i]]^T) @ bt[pages[i]]``: each token with its
    own adapter's rows, gathered; two batched matmuls for all ``n`` tokens."""
    n, width = pages.shape
    flat = pages.reshape(-1)  # index_select copies whole rows: 5x faster than a[pages] here
    xs = x.index_select(0, tokens).unsqueeze(-1)  # [n, in, 1]
    xa = torch.bmm(a.index_select(0, flat).view(n, width, -1), xs)  # [n, width, 1]
    delta = torch.bmm(xa.transpose(1, 2), bt.index_select(0, flat).view(n, width, -1))
    y.index_add_(0, tokens, delta.squeeze(1))  # delta: [n, 1, out]


def lora_csr(
    x: torch.Tensor,  # [tokens, in]
    y: torch.Tensor,  # [tokens, out], updated in place
    lo: int,
    hi: int,
    shrink: torch.Tensor,  # sparse CSR [hi - lo, pages]: row t - lo has token t's entries
    a: torch.Tensor,  # [pages, in], contiguous
    bt: torch.Tensor,  # [pages, out]
) -> None:
    """``y[t] += sum_p (x[t] . a[p]) * bt[p]`` over the columns ``p`` of token ``t``'s
    entries in ``shrink`` (``lo <= t < hi``): each token with its own adapter's rank rows,
    the entries' pages. ``shrink``'s values are not read.

    CPU, float32 or float64 only (``sampled_addmm`` has no other dtype there). Raises
    RuntimeError from torch for anything else. ``a`` must be contiguous: ``sampled_addmm``
    copies a strided matrix whole.
    """
    xa = torch.sparse.sampled_addmm(shrink, x[lo:hi], a.t(), beta=0.0)  # reads the pages' rows
    y[lo:hi].addmm_(xa, bt)  # reads only the entries' rows


def lora_union(
    x: torch.Tensor,  # [tokens, in]
    y: torch.Tensor,  # [tokens, out], updated in place
    lo: int,
    hi: int,
    own: torch.Tensor,  # [hi - lo, cols]: 1 where the column is a rank row of the row's adapter
    pages: torch.Tensor,  # [cols] int: each column's page
    a: torch.Tensor,  # [pages, in]
    bt: torch.Tensor,  # [pages, out]
) -> None:
    """``y[lo:hi] += ((x[lo:hi] @ a[pages]^T) * own) @ bt[pages]``: every token against every
    rank row of the step's adapters (one dense matmul), its own adapter's kept. For few
    adapters shared by many tokens, where that costs less than one entry per token and row."""
    xa = (x[lo:hi] @ a.index_select(0, pages).t()).mul_(own)  # [hi - lo, cols]
    y[lo:hi].addmm_(xa, bt.index_select(0, pages))


def lora_sgmv(
    x: torch.Tensor,  # [tokens, in]
    y: torch.Tensor,  # [tokens, out], updated in place
    start: int,
    end: int,
    a_rows: torch.Tensor,  # [rank, in]: one adapter's rows (a view of the pool, or gathered)
    bt_rows: torch.Tensor,  # [rank, out]
) -> None:
    """``y[start:end] += (x[start:end] @ a_rows^T) @ bt_rows``: one segment, one adapter."""
    y[start:end].addmm_(x[start:end] @ a_rows.t(), bt_rows)  # the add inside the expand


def lora_tokens(
    x: torch.Tensor,  # [tokens, in]
    y: torch.Tensor,  # [tokens, out], updated in place
    tokens: torch.Tensor,  # [n] int: tokens that use one adapter, anywhere in the batch
    a_rows: torch.Tensor,  # [rank, in]
    bt_rows: torch.Tensor,  # [rank, out]
) -> None:
    """``y[tokens] += (x[tokens] @ a_rows^T) @ bt_rows``: scattered tokens of one adapter."""
    y.index_add_(0, tokens, (x.index_select(0, tokens) @ a_rows.t()) @ bt_rows)


def adapter_rows(
    view: torch.Tensor, rows: slice | torch.Tensor
) -> torch.Tensor:  # [pages, n] -> [rank, n]
    """An adapter's rows of a page view: a slice (one run of pages) or its pages gathered."""
    if isinstance(rows, slice):
        return view[rows]
    return view.index_select(0, rows)
