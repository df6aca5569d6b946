"""The multi-LoRA linear layer and the per-forward batch state every wrapped layer reads.

Semantics: ``y[i] = base(x[i]) + (x[i] @ A[s_i]^T) @ Bt[s_i]`` for every row ``i`` whose slot
``s_i`` is not None (``Bt = scale * B^T``, folded in when packing), and ``y[i] = base(x[i])``
for rows without an adapter. ``x`` is ``[rows, tokens, in]``; a row is one sequence.

Two ways to compute the same thing, chosen per forward by :class:`LoraBatchState`:

* **gather**: per rank class, gather each row's ``A``/``Bt`` ([n, rank_c, in] / [n, rank_c,
  out]) and do two batched matmuls; the work is independent of how many distinct adapters the
  batch holds.
* **segmented**: group rows by slot, one pair of plain matmuls per adapter on views of the
  pool (no gather); cheapest when few adapters serve many rows (prefill, one hot adapter).

``mode="auto"`` picks segmented when there are at most ``segment_max_groups`` (2) distinct
adapters, gather otherwise. Measured on the CPU (2 cores, "small" random Llama, rank 16, 32
rows, 16 new tokens; ``python -m vajra.bench.adapters --kernels --no-peft --counts
1,2,3,4,8,32,128``), tokens/s gather vs segmented: 1 adapter 1916 vs 2058, 2: 1719 vs 1764,
3: 1719 vs 1713, 4: 1976 vs 1686, 8: 1694 vs 1320, 32: 1687 vs 903, 128 (128 rows): 2401 vs
1079. Segmented's per-adapter Python loop loses as soon as adapters outnumber a couple.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vajra.gpu.lora.pool import LoraPool

Mode = Literal["auto", "gather", "segmented"]


def lora_gather(
    x: torch.Tensor,  # [rows, tokens, in]
    y: torch.Tensor,  # [rows, tokens, out], updated in place
    rows: torch.Tensor,  # [n] int64: rows of x that use this rank class
    slots: torch.Tensor,  # [n] int64: each of those rows' slot inside the class
    a: torch.Tensor,  # [slots_c, rank_c, in]
    bt: torch.Tensor,  # [slots_c, rank_c, out]
    *,
    all_rows: bool = False,  # rows is exactly 0..rows-1: skip the row gather/scatter
) -> None:
    """``y[rows[k]] += (x[rows[k]] @ a[slots[k]]^T) @ bt[slots[k]]``, batched."""
    xs = x if all_rows else x.index_select(0, rows)
    xa = torch.bmm(xs, a.index_select(0, slots).transpose(1, 2))  # [n, tokens, rank_c]
    delta = torch.bmm(xa, bt.index_select(0, slots))  # [n, tokens, out]
    if all_rows:
        y.add_(delta)
    else:
        y.index_add_(0, rows, delta)


def lora_segment(
    x: torch.Tensor,  # [rows, tokens, in]
    y: torch.Tensor,  # [rows, tokens, out], updated in place
    rows: torch.Tensor | None,  # [n] int64 rows using this adapter; None: rows start..end
    start: int,
    end: int,
    a: torch.Tensor,  # [rank, in]: one adapter's A (a view into the pool)
    bt: torch.Tensor,  # [rank, out]
) -> None:
    """``y[r] += (x[r] @ a^T) @ bt`` for the rows ``r`` of one adapter."""
    if rows is None:
        xs = x[start:end]
        y[start:end] += (xs @ a.t()) @ bt
    else:
        xs = x.index_select(0, rows)
        y.index_add_(0, rows, (xs @ a.t()) @ bt)


@dataclass(frozen=True)
class _Group:
    """Rows of one forward that share one adapter (segmented) or one rank class (gather)."""

    cls: int  # rank class index
    local: int  # slot inside the class (segmented only; -1 for a gather group)
    rank: int  # units to use
    start: int  # offsets into the index buffer
    end: int
    contiguous: bool  # the rows are start_row..start_row+n-1 of x, in order
    first_row: int


class LoraBatchState:
    """Which pool slot each row of the current forward uses; shared by every wrapped layer.

    :meth:`set_rows` is called once before each forward with one entry per row (a slot id or
    None). The mapping is computed on the host as plain lists and copied in one transfer into a
    preallocated index buffer (grown only if a batch is larger than any before); layers then
    read views of it. :meth:`clear` (or leaving :meth:`rows`) resets to "no adapters", so a
    forward that sets nothing runs the base model alone.
    """

    def __init__(
        self,
        pool: LoraPool,
        *,
        max_rows: int = 64,
        mode: Mode = "auto",
        segment_max_groups: int = 2,
    ) -> None:
        self.pool = pool
        self.mode: Mode = mode
        self.segment_max_groups = segment_max_groups
        self._index = torch.zeros(2 * max_rows, dtype=torch.int64, device=pool.device)
        self._groups: list[_Group] = []
        self._segmented = False
        self.active = False

    def set_rows(self, slots: Sequence[int | None]) -> None:
        """Map row ``i`` of the next forward to ``slots[i]`` (None: base model only)."""
        by_slot: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if slot is not None:
                if not self.pool.is_loaded(slot):
                    raise KeyError(f"row {row}: slot {slot} holds no adapter")
                by_slot.setdefault(slot, []).append(row)
        self._groups = []
        self.active = bool(by_slot)
        if not by_slot:
            return
        self.pool.wait_ready(by_slot)
        segmented = self.mode == "segmented" or (
            self.mode == "auto" and len(by_slot) <= self.segment_max_groups
        )
        flat: list[int] = []
        if segmented:
            for slot in sorted(by_slot):
                rows = by_slot[slot]
                c, local = self.pool.locate(slot)
                self._groups.append(_group(c, local, self.pool.rank_of(slot), len(flat), rows))
                flat += rows
        else:
            per_class: dict[int, tuple[list[int], list[int]]] = {}
            for slot in sorted(by_slot):
                c, local = self.pool.locate(slot)
                rows, locals_ = per_class.setdefault(c, ([], []))
                rows += by_slot[slot]
                locals_ += [local] * len(by_slot[slot])
            for c, (rows, locals_) in sorted(per_class.items()):
                order = sorted(range(len(rows)), key=rows.__getitem__)
                rows = [rows[k] for k in order]
                locals_ = [locals_[k] for k in order]
                group = _group(c, -1, self.pool.rank_classes[c], len(flat), rows)
                self._groups.append(group)
                flat += rows + locals_
        if len(flat) > self._index.numel():
            self._index = torch.zeros(2 * len(flat), dtype=torch.int64, device=self.pool.device)
        host = torch.tensor(flat, dtype=torch.int64)
        self._index[: len(flat)].copy_(host, non_blocking=True)
        self._segmented = segmented
        self._num_rows = len(slots)

    def clear(self) -> None:
        self._groups = []
        self.active = False

    @contextmanager
    def rows(self, slots: Sequence[int | None] | None) -> Iterator[None]:
        """``set_rows(slots)`` for the duration of the block (nothing if ``slots`` is None)."""
        if slots is None:
            self.clear()
            yield
            return
        self.set_rows(slots)
        try:
            yield
        finally:
            self.clear()

    def apply(self, module_index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add this forward's LoRA deltas for one module to ``y`` (see module Semantics)."""
        if not self.active:
            return y
        views = self.pool.module_views(module_index)
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        y3 = y.view(y.shape[0], -1, y.shape[-1])
        index = self._index
        if self._segmented:
            for g in self._groups:
                a, bt = views[g.cls]
                rows = None if g.contiguous else index[g.start : g.end]
                first = g.first_row
                n = g.end - g.start
                lora_segment(
                    x3, y3, rows, first, first + n, a[g.local, : g.rank], bt[g.local, : g.rank]
                )
        else:
            for g in self._groups:
                a, bt = views[g.cls]
                n = g.end - g.start
                rows = index[g.start : g.end]
                slots = index[g.end : g.end + n]
                all_rows = g.contiguous and g.first_row == 0 and n == self._num_rows
                lora_gather(x3, y3, rows, slots, a, bt, all_rows=all_rows)
        return y


def _group(cls: int, local: int, rank: int, start: int, rows: list[int]) -> _Group:
    contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
    return _Group(cls, local, rank, start, start + len(rows), contiguous, rows[0])


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus, per row, that row's adapter from the pool.

    ``base_layer`` is the original module, untouched (PEFT's naming). The adapter weights are
    not parameters of this module: they live in the pool and are read through the shared
    :class:`LoraBatchState`.
    """

    def __init__(self, base_layer: nn.Linear, state: LoraBatchState, module_index: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.module_index = module_index
        self._state = state

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base_layer(x)
        return self._state.apply(self.module_index, x, y)

    def extra_repr(self) -> str:
        return f"module_index={self.module_index}"
