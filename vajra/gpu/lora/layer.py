"""The multi-LoRA linear layer and the per-forward batch state every wrapped layer reads.

Semantics: ``y[t] += (x[t] @ A[s(t)]^T) @ Bt[s(t)]`` for each token t in a segment of slot s(t).

Here ``y = base(x)`` to start with; ``A[s]`` [r, in] and ``Bt[s]`` [r, out] are adapter
``s``'s rank rows for the layer's module (``Bt = scale * B^T``, folded in when packing; ``r``
is the adapter's rank for the module's kind, 0 for a kind it does not target), and a token in
no segment, or in one whose slot is None, gets no delta. The torch path and the Triton path
compute exactly this.

A forward's input is ``[1, T, in]`` (or ``[T, in]``): a step's decode tokens and prefill
chunks packed with no padding. :meth:`LoraBatchState.set_segments`, called once before the
forward, says which tokens use which slot (:mod:`vajra.gpu.lora.segments`); :meth:`clear`
after it. Each segment is computed one of two ways:

* **gather** (BGMV-like), segments of at most ``gather_max_tokens`` tokens (a decode token):
  each token with its own adapter's rows, read through the pool's page table. On the CPU
  (float32/float64) the torch path computes all of a step's gather tokens per module in a
  fixed number of calls whatever the number of adapters and ranks, choosing per module kind
  by a cost estimate between one sparse CSR matrix (an entry per token and rank row: exact
  ranks, ``Bt`` read in place) and one dense matmul against every rank row of the step's
  adapters, masked to each token's own (fewer calls when few adapters share many tokens);
  elsewhere it groups the tokens by rank bucket, so no token computes more rows than the
  power of two above its own rank (:mod:`vajra.gpu.lora.torch_kernels`).
* **segmented** (SGMV-like), longer segments (a prefill chunk): one matmul pair per segment
  on the adapter's rows, a view of the pool when its pages are one run (else a gather of its
  ``r`` rows): never a per-token gather of ``A``. Adjacent segments of one adapter merge.

With at most ``segment_max_groups`` (2) distinct adapters among the gather tokens, the torch
path computes them as one matmul pair per adapter on its tokens instead (no weight gather).
The row layer this replaced measured why, on the CPU (2 cores, "small" random Llama, rank 16,
32 rows, 16 new tokens), tokens/s gathered vs per adapter: 1 adapter 1916 vs 2058, 2: 1719 vs
1764, 3: 1719 vs 1713, 4: 1976 vs 1686, 8: 1694 vs 1320, 32: 1687 vs 903.

Backends: the torch path (:mod:`vajra.gpu.lora.torch_kernels`) on the CPU and wherever triton
is missing; the Triton kernels (:mod:`vajra.gpu.lora.triton_kernels`), by default when the
pool is on CUDA and triton imports, with one shrink and one expand launch per step kind
(decode, prefill) per wrapped module for every adapter of the batch; for the decode tokens,
per group of up to three modules reading one input (:meth:`LoraBatchState.apply_group`, which
the fused forwards of :mod:`vajra.gpu.fused_layers` call for the query, key and value, and for
the gate and up projections).

Per step, the index data is built as host lists and copied in one transfer into a
preallocated device buffer (grown only when a batch is larger than any before); the adapters'
page and rank tables already live on the device (:mod:`vajra.gpu.lora.pool`). The static form
(:meth:`LoraBatchState.set_static`, Triton only) plans nothing on the host: a captured decode
graph (:mod:`vajra.gpu.decode_graphs`) reads each token's slot from a device buffer.

:meth:`LoraBatchState.set_rows` is the row form, for callers that run padded ``[rows,
tokens, in]`` batches through ``transformers``' ``generate`` (the adapter benchmark, the torch
engine): row ``i`` is one segment of ``tokens`` tokens, laid out when the first wrapped layer
sees the shape.
"""

from __future__ import annotations

import array
import importlib.util
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from vajra.gpu.lora.pool import LoraPool
from vajra.gpu.lora.segments import (
    GatherToken,
    LongSegment,
    Segment,
    rank_bucket,
    row_segments,
    segment_blocks,
    split_segments,
)
from vajra.gpu.lora.torch_kernels import GatherKernel as PlannedKernel
from vajra.gpu.lora.torch_kernels import KindWork, TorchPlanner

Mode = Literal["auto", "gather", "segmented"]
#: Modules one BGMV launch pair covers (:data:`vajra.gpu.lora.triton_kernels.MAX_GROUP`; that
#: module imports triton, which the torch path does without).
_MAX_GROUP = 3
Backend = Literal["auto", "torch", "triton"]
GatherKernel = Literal["auto", "csr", "union", "bmm"]


@dataclass(eq=False)
class _TritonWork:
    """What the Triton path launches this step (the same for every kind)."""

    decode: tuple[torch.Tensor, torch.Tensor] | None  # tokens [n], slots [n]
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # starts, counts, slots
    widths: list[int]  # per kind: scratch width; 0: no adapter of the batch targets the kind


class LoraBatchState:
    """Which pool slot each token of the current forward uses; shared by every wrapped layer.

    ``mode`` picks the computation per segment: "auto" (gather up to ``gather_max_tokens``
    tokens, segmented above), or "gather" / "segmented" for every segment (for tests and
    the benchmark). In "auto" the torch path computes the gather tokens of at most
    ``segment_max_groups`` distinct adapters as one matmul pair per adapter (module
    docstring). ``backend``: "auto" (Triton on CUDA when it imports), "torch", "triton".
    ``gather_kernel``, the torch path's kernel for the gather tokens of more adapters:
    "auto" (on a float32/float64 CPU pool, CSR or union per kind by a cost estimate; else
    rank buckets), or "csr", "union", "bmm" (rank buckets) for every kind (tests, the
    benchmark); "csr" on another device or dtype raises ValueError.
    ``max_tokens`` (or ``max_rows``, the row form's batch size) sizes the index buffer.
    """

    def __init__(
        self,
        pool: LoraPool,
        *,
        max_tokens: int = 512,
        max_rows: int | None = None,
        mode: Mode = "auto",
        backend: Backend = "auto",
        gather_max_tokens: int = 1,
        segment_max_groups: int = 2,
        gather_kernel: GatherKernel = "auto",
    ) -> None:
        self.pool = pool
        self.mode: Mode = mode
        self.gather_max_tokens = gather_max_tokens
        self.segment_max_groups = segment_max_groups
        self.backend: Literal["torch", "triton"] = _choose_backend(backend, pool.device)
        csr_ok = pool.device.type == "cpu" and pool.dtype in (torch.float32, torch.float64)
        if gather_kernel == "csr" and not csr_ok:
            raise ValueError(
                f"the CSR kernel needs a float32/float64 pool on the CPU: {pool.dtype}"
            )
        self.gather_kernel: PlannedKernel = (
            ("cost" if csr_ok else "bmm") if gather_kernel == "auto" else gather_kernel
        )
        capacity = 4 * max(max_tokens, max_rows or 0, 1)
        self._index = torch.zeros(capacity, dtype=torch.int32, device=pool.device)
        self._scratch = torch.zeros(0, dtype=torch.float32, device=pool.device)
        self._torch = TorchPlanner(pool, self.gather_kernel)
        self.active = False
        self._rows: list[int | None] | None = None
        self._num_tokens = -1
        self._kinds: list[KindWork] = []
        self._triton: _TritonWork | None = None
        self._triton_scratch = self._scratch
        self._static_scratch: torch.Tensor | None = None

    # ------------------------------------------------------------------ per step

    def set_segments(self, segments: Sequence[Segment], num_tokens: int) -> None:
        """Map the next forward's ``num_tokens`` packed tokens to slots: each segment
        ``(start, length, slot)`` covers tokens ``start .. start + length - 1``, in order,
        without overlap; slot None (or no segment) means the base model alone.

        Raises KeyError for a slot that holds no adapter, ValueError for bad segments. Orders
        the current stream after the copies into the batch's slots (``pool.wait_ready``).
        """
        self.clear()
        self._plan(segments, num_tokens)

    def set_rows(self, slots: Sequence[int | None]) -> None:
        """Row form: row ``i`` of the next forwards' ``[rows, tokens, in]`` inputs uses
        ``slots[i]`` (None: base model only), until :meth:`clear`."""
        self.clear()
        used = sorted({s for s in slots if s is not None})
        if used:
            self.ready(used)
            self._rows = list(slots)
            self.active = True

    def set_static(self, tokens: torch.Tensor, slots: torch.Tensor) -> None:
        """Graph form, Triton backend only: the next forwards' ``tokens.numel()`` tokens are
        decode tokens (``tokens``: int32 ``[n]``, token ``i`` is ``i``) whose slots the kernels
        read from the device tensor ``slots`` (int32 ``[n]``; ``pool.null_slot`` for a base
        row) when they run. So one captured forward (:mod:`vajra.gpu.decode_graphs`) serves any
        mix of adapters: every kind is launched at the width of the pool's ``max_rank`` into a
        scratch buffer allocated on the first call (a later call with more tokens raises
        ValueError). Nothing is checked or awaited: call :meth:`ready` with the slots before
        each replay. Raises ValueError on the torch backend."""
        if self.backend != "triton":
            raise ValueError("the static (graph) form needs the triton backend")
        self.clear()
        n = tokens.numel()
        width = max(16, rank_bucket(self.pool.max_rank))
        need = n * width * _MAX_GROUP
        if self._static_scratch is None:
            self._static_scratch = torch.zeros(need, dtype=torch.float32, device=slots.device)
        elif self._static_scratch.numel() < need:
            raise ValueError(f"{n} static tokens: more than the first call's scratch holds")
        kinds = len(self.pool.layout.kinds)
        self._triton = _TritonWork(decode=(tokens, slots), blocks=None, widths=[width] * kinds)
        self._triton_scratch = self._static_scratch
        self._num_tokens = n
        self.active = True

    def ready(self, slots: Sequence[int]) -> None:
        """Check that every one of ``slots`` holds an adapter (KeyError if not) and order the
        current stream after the copies into them (``pool.wait_ready``)."""
        for slot in slots:
            if not self.pool.is_loaded(slot):
                raise KeyError(f"slot {slot} holds no adapter")
        self.pool.wait_ready(slots)

    def clear(self) -> None:
        """Back to "no adapters": a forward runs the base model alone."""
        self.active = False
        self._rows = None
        self._num_tokens = -1
        self._kinds = []
        self._triton = None

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

    def _plan(self, segments: Sequence[Segment], num_tokens: int) -> None:
        limit = {"auto": self.gather_max_tokens, "gather": num_tokens, "segmented": 0}[self.mode]
        gather, long = split_segments(segments, num_tokens, gather_max_tokens=limit)
        slots = sorted({s for _, s in gather} | {s for _, _, s in long})
        if not slots:
            return
        self.ready(slots)
        ranks = {s: self.pool.ranks_of(s) for s in slots}
        if self.backend == "triton":
            self._plan_triton(gather, long, ranks, num_tokens)
        else:
            max_groups = self.segment_max_groups if self.mode == "auto" else 0
            self._kinds = self._torch.plan(
                gather, long, ranks, max_groups=max_groups, upload=self._upload
            )
        self._num_tokens = num_tokens
        self.active = True

    def _plan_triton(
        self,
        gather: list[GatherToken],
        long: list[LongSegment],
        ranks: dict[int, tuple[int, ...]],
        num_tokens: int,
    ) -> None:
        from vajra.gpu.lora.triton_kernels import SGMV_BLOCK_M

        blocks = segment_blocks(long, SGMV_BLOCK_M)
        n, m = len(gather), len(blocks)
        flat = [t for t, _ in gather] + [s for _, s in gather]
        for column in range(3):
            flat += [block[column] for block in blocks]
        index = self._upload(flat)
        widths = []
        for kind in range(len(self.pool.layout.kinds)):
            top = max(r[kind] for r in ranks.values())
            widths.append(max(16, rank_bucket(top)) if top else 0)
        self._triton = _TritonWork(
            decode=(index[:n], index[n : 2 * n]) if n else None,
            blocks=(
                (index[2 * n : 2 * n + m], index[2 * n + m : 2 * n + 2 * m], index[2 * n + 2 * m :])
                if m
                else None
            ),
            widths=widths,
        )
        need = num_tokens * max(widths) * _MAX_GROUP
        if need > self._scratch.numel():
            self._scratch = torch.zeros(2 * need, dtype=torch.float32, device=self.pool.device)
        self._triton_scratch = self._scratch

    def _upload(self, flat: list[int]) -> torch.Tensor:
        """``flat`` in the device index buffer, one copy; grown only past every earlier size."""
        if len(flat) > self._index.numel():
            self._index = torch.zeros(2 * len(flat), dtype=torch.int32, device=self.pool.device)
        index = self._index[: len(flat)]
        if flat:  # through an array: a quarter of torch.tensor(list)'s time
            host = torch.frombuffer(array.array("i", flat), dtype=torch.int32)
            index.copy_(host, non_blocking=True)
        return index

    # ------------------------------------------------------------------ per layer

    def apply(self, module_index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Add this forward's LoRA deltas for one module to ``y`` (module Semantics) and
        return it: :meth:`apply_group` of one."""
        return self.apply_group([module_index], x, [y])[0]

    def apply_group(
        self, module_indices: Sequence[int], x: torch.Tensor, ys: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Add this forward's LoRA deltas for modules that read the same input ``x`` to their
        outputs ``ys`` and return them. In place when an output's rows have their elements
        adjacent, also when the rows are strided (a module's columns of one merged
        projection, :mod:`vajra.gpu.fused_layers`); otherwise into a contiguous copy. On
        the Triton path one BGMV launch pair covers the decode tokens of up to three
        modules."""
        outs = list(ys)
        if not self.active:
            return outs
        rows = []
        for i, y in enumerate(outs):
            y2 = _rows_of(y)
            if y2 is None:
                outs[i] = y = y.contiguous()
                y2 = y.view(-1, y.shape[-1])
            rows.append(y2)
        x2 = x.reshape(-1, x.shape[-1])
        tokens = x2.shape[0]
        if tokens != self._num_tokens:
            if self._rows is None:
                raise ValueError(
                    f"the batch has {tokens} tokens; the segments described {self._num_tokens}"
                )
            per_row, rest = divmod(tokens, len(self._rows))
            if rest:
                raise ValueError(f"{tokens} tokens do not make {len(self._rows)} equal rows")
            self._plan(row_segments(self._rows, per_row), tokens)
        if self._triton is not None:
            from vajra.gpu.lora.triton_kernels import apply_modules

            work, scratch = self._triton, self._triton_scratch
            apply_modules(
                self.pool, module_indices, x2, rows, scratch, work.decode, work.blocks, work.widths
            )
            return outs
        for module_index, y2 in zip(module_indices, rows, strict=True):
            a, bt = self.pool.module_views(module_index)
            self._kinds[self.pool.layout.module_kinds[module_index]].apply(x2, y2, a, bt)
        return outs


def _rows_of(y: torch.Tensor) -> torch.Tensor | None:
    """``y`` as a ``[tokens, out]`` view with adjacent elements in a row; None if none is."""
    if y.stride(-1) != 1:
        return None
    try:
        return y.view(-1, y.shape[-1])
    except RuntimeError:  # rows that no single stride describes
        return None


def _choose_backend(backend: Backend, device: torch.device) -> Literal["torch", "triton"]:
    if backend != "auto":
        return backend
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus, per token, that token's adapter from the pool.

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
        return self._state.apply(self.module_index, x, self.base_layer(x))

    def extra_repr(self) -> str:
        return f"module_index={self.module_index}"


def add_deltas(
    projections: Sequence[nn.Module], x: torch.Tensor, ys: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Each projection's adapter deltas of input ``x`` added to its output in ``ys`` (its base
    output, or its columns of a merged projection), which are returned: together
    (:meth:`LoraBatchState.apply_group`) when every projection is a :class:`MultiLoraLinear`
    of one batch state; a projection that is none gets no delta."""
    states = {id(p._state) for p in projections if isinstance(p, MultiLoraLinear)}
    if len(states) == 1 and all(isinstance(p, MultiLoraLinear) for p in projections):
        wrapped = [p for p in projections if isinstance(p, MultiLoraLinear)]
        return wrapped[0]._state.apply_group([p.module_index for p in wrapped], x, ys)
    return [
        p._state.apply(p.module_index, x, y) if isinstance(p, MultiLoraLinear) else y
        for p, y in zip(projections, ys, strict=True)
    ]
