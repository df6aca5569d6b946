# mypy: disable-error-code="no-untyped-def, untyped-decorator, misc"
# (the @triton.jit kernels below take untyped pointers and scalars; the launchers are typed)
"""The Triton path of the multi-LoRA layer: shrink and expand, BGMV and SGMV style.

Semantics: those of :mod:`vajra.gpu.lora.layer`, ``y[t] += (x[t] @ A[s(t)]^T) @ Bt[s(t)]``,
where ``A[s]``/``Bt[s]`` are the rows of the pages the pool's page table lists for slot ``s``
and the module's kind, as many as the rank table says (0: no delta).

* **shrink** ``xa[t, :r] = x[t] @ A_s^T`` and **expand** ``y[t] += xa[t, :r] @ Bt_s``, with
  ``xa`` a float32 ``[tokens, width]`` scratch buffer (``width`` a power of two >= 16 covering
  every rank in the batch; rows past a token's rank are masked, never computed from memory).
* **BGMV** (decode): one program per token and module (expand: per token, module and block
  of outputs), each loading its own adapter's rows through the page table. One launch covers
  a group of up to three modules that read the same input (a layer's query, key and value
  projections, or its gate and up projections), each with its own output, pages and ranks.
* **SGMV** (prefill): one program per block of up to ``BLOCK_M`` tokens of one segment (and
  block of outputs for expand), a ``tl.dot`` of the block with the adapter's rows.

One launch of each per layer-module (BGMV: per group of modules) per step covers every
adapter of the batch. Accumulation
is in float32; float32 operands use IEEE dot products (no TF32), so the result matches the
torch path to float32 rounding.

Tested in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` set before triton is
imported) against the torch path and a per-token reference; not yet run on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

if TYPE_CHECKING:
    from vajra.gpu.lora.pool import LoraPool

BGMV_BLOCK_K = 128  # input features per shrink step
BGMV_BLOCK_N = 128  # outputs per expand program
SGMV_BLOCK_M = 32  # tokens per SGMV program
SGMV_BLOCK_K = 64
SGMV_BLOCK_N = 64
#: Most modules one BGMV launch covers (a layer's query, key and value projections).
MAX_GROUP = 3


@triton.jit
def _member(g, first, second, third):
    """Group member ``g``'s value of an argument passed once per member."""
    if g == 0:
        value = first
    elif g == 1:
        value = second
    else:
        value = third
    return value


# The members' integers are not specialised: a value of 1 would become a constant, of another
# type than the other members' in :func:`_member`'s branches.
@triton.jit(do_not_specialize=["stride_a0", "stride_a1", "stride_a2"])
def _bgmv_shrink(
    x_ptr,
    a0,
    a1,
    a2,
    xa_ptr,
    token_ptr,
    slot_ptr,
    page0,
    page1,
    page2,
    rank0,
    rank1,
    rank2,
    in_features,
    stride_x,
    stride_a0,
    stride_a1,
    stride_a2,
    stride_xa,
    stride_page,
    stride_rank,
    WIDTH: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # program (token i, group member g): xa[token, g * WIDTH + j] = x[token] . A_g[page j]
    i = tl.program_id(0)
    g = tl.program_id(1)
    a_ptr = _member(g, a0, a1, a2)
    page_ptr = _member(g, page0, page1, page2)
    rank_ptr = _member(g, rank0, rank1, rank2)
    stride_a = _member(g, stride_a0, stride_a1, stride_a2)
    token = tl.load(token_ptr + i).to(tl.int64)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    rank = tl.load(rank_ptr + slot * stride_rank)
    if rank == 0:
        return
    j = tl.arange(0, WIDTH)
    live = j < rank
    pages = tl.load(page_ptr + slot * stride_page + j, mask=live, other=0).to(tl.int64)
    acc = tl.zeros([WIDTH], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_in = k < in_features
        xv = tl.load(x_ptr + token * stride_x + k, mask=k_in, other=0.0).to(tl.float32)
        av = tl.load(
            a_ptr + pages[:, None] * stride_a + k[None, :],
            mask=live[:, None] & k_in[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(av * xv[None, :], axis=1)
    tl.store(xa_ptr + token * stride_xa + g * WIDTH + j, acc)


@triton.jit(
    do_not_specialize=[
        *("out0", "out1", "out2", "stride_b0", "stride_b1", "stride_b2"),
        *("stride_y0", "stride_y1", "stride_y2"),
    ]
)
def _bgmv_expand(
    xa_ptr,
    b0,
    b1,
    b2,
    y0,
    y1,
    y2,
    token_ptr,
    slot_ptr,
    page0,
    page1,
    page2,
    rank0,
    rank1,
    rank2,
    out0,
    out1,
    out2,
    stride_xa,
    stride_b0,
    stride_b1,
    stride_b2,
    stride_y0,
    stride_y1,
    stride_y2,
    stride_page,
    stride_rank,
    WIDTH: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program (token i, group member g, block of outputs): y_g[token, n] += xa . Bt_g[:, n]
    i = tl.program_id(0)
    g = tl.program_id(1)
    b_ptr = _member(g, b0, b1, b2)
    y_ptr = _member(g, y0, y1, y2)
    page_ptr = _member(g, page0, page1, page2)
    rank_ptr = _member(g, rank0, rank1, rank2)
    out_features = _member(g, out0, out1, out2)
    stride_b = _member(g, stride_b0, stride_b1, stride_b2)
    stride_y = _member(g, stride_y0, stride_y1, stride_y2)
    token = tl.load(token_ptr + i).to(tl.int64)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    rank = tl.load(rank_ptr + slot * stride_rank)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    if rank == 0 or tl.program_id(2) * BLOCK_N >= out_features:
        return
    j = tl.arange(0, WIDTH)
    live = j < rank
    pages = tl.load(page_ptr + slot * stride_page + j, mask=live, other=0).to(tl.int64)
    xa = tl.load(xa_ptr + token * stride_xa + g * WIDTH + j, mask=live, other=0.0)
    n_in = n < out_features
    bv = tl.load(
        b_ptr + pages[:, None] * stride_b + n[None, :],
        mask=live[:, None] & n_in[None, :],
        other=0.0,
    ).to(tl.float32)
    delta = tl.sum(xa[:, None] * bv, axis=0)
    y_at = y_ptr + token * stride_y + n
    y = tl.load(y_at, mask=n_in, other=0.0).to(tl.float32)
    tl.store(y_at, (y + delta).to(y_ptr.dtype.element_ty), mask=n_in)


@triton.jit
def _sgmv_shrink(
    x_ptr,
    a_ptr,
    xa_ptr,
    start_ptr,
    count_ptr,
    slot_ptr,
    page_ptr,
    rank_ptr,
    in_features,
    stride_x,
    stride_a,
    stride_xa,
    stride_page,
    stride_rank,
    WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(start_ptr + b).to(tl.int64)
    count = tl.load(count_ptr + b)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    rank = tl.load(rank_ptr + slot * stride_rank)
    if rank == 0:
        return
    m = tl.arange(0, BLOCK_M)
    m_in = m < count
    tokens = start + m
    j = tl.arange(0, WIDTH)
    live = j < rank
    pages = tl.load(page_ptr + slot * stride_page + j, mask=live, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_M, WIDTH], dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_in = k < in_features
        xb = tl.load(
            x_ptr + tokens[:, None] * stride_x + k[None, :],
            mask=m_in[:, None] & k_in[None, :],
            other=0.0,
        )
        ab = tl.load(
            a_ptr + pages[None, :] * stride_a + k[:, None],
            mask=k_in[:, None] & live[None, :],
            other=0.0,
        )  # [BLOCK_K, WIDTH]
        if IEEE:
            acc += tl.dot(xb, ab, input_precision="ieee")
        else:
            acc += tl.dot(xb, ab)
    tl.store(xa_ptr + tokens[:, None] * stride_xa + j[None, :], acc, mask=m_in[:, None])


@triton.jit
def _sgmv_expand(
    xa_ptr,
    b_ptr,
    y_ptr,
    start_ptr,
    count_ptr,
    slot_ptr,
    page_ptr,
    rank_ptr,
    out_features,
    stride_xa,
    stride_b,
    stride_y,
    stride_page,
    stride_rank,
    WIDTH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    start = tl.load(start_ptr + b).to(tl.int64)
    count = tl.load(count_ptr + b)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    rank = tl.load(rank_ptr + slot * stride_rank)
    if rank == 0:
        return
    m = tl.arange(0, BLOCK_M)
    m_in = m < count
    tokens = start + m
    j = tl.arange(0, WIDTH)
    live = j < rank
    pages = tl.load(page_ptr + slot * stride_page + j, mask=live, other=0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = n < out_features
    xa = tl.load(
        xa_ptr + tokens[:, None] * stride_xa + j[None, :],
        mask=m_in[:, None] & live[None, :],
        other=0.0,
    )  # [BLOCK_M, WIDTH] float32
    bb = tl.load(
        b_ptr + pages[:, None] * stride_b + n[None, :],
        mask=live[:, None] & n_in[None, :],
        other=0.0,
    )  # [WIDTH, BLOCK_N]
    if IEEE:
        delta = tl.dot(xa, bb.to(tl.float32), input_precision="ieee")
    else:
        delta = tl.dot(xa.to(bb.dtype), bb)
    y_at = y_ptr + tokens[:, None] * stride_y + n[None, :]
    y_in = m_in[:, None] & n_in[None, :]
    y = tl.load(y_at, mask=y_in, other=0.0).to(tl.float32)
    tl.store(y_at, (y + delta).to(y_ptr.dtype.element_ty), mask=y_in)


@dataclass(frozen=True, slots=True)
class Member:
    """One module of a BGMV group: its output and its kind's tables and pages."""

    y: torch.Tensor  # [tokens, out], updated in place; rows may be strided
    pages: torch.Tensor  # [slots, max_rank] int32: the page table of the module's kind
    ranks: torch.Tensor  # [slots] int32 (any stride): the rank table of the module's kind
    a: torch.Tensor  # [pages, in]
    bt: torch.Tensor  # [pages, out]


def bgmv(
    x: torch.Tensor,  # [tokens, in], unit stride in features
    xa: torch.Tensor,  # [tokens, >= len(group) * width] float32 scratch
    width: int,  # a power of two >= 16 covering every rank of the batch
    tokens: torch.Tensor,  # [n] int32
    slots: torch.Tensor,  # [n] int32
    group: Sequence[Member],
) -> None:
    """Shrink then expand for decode tokens, for up to :data:`MAX_GROUP` modules that read
    the same input ``x`` (a layer's query, key and value projections): one shrink launch
    with a program per token and module, one expand launch with a program per token, module
    and block of outputs. The modules' page and rank tables must share their strides (they
    are one pool's)."""
    if not 1 <= len(group) <= MAX_GROUP:
        raise ValueError(f"a group of 1 to {MAX_GROUP} modules, not {len(group)}")
    if xa.shape[1] < len(group) * width:
        raise ValueError(f"scratch of {xa.shape[1]} columns for {len(group)} x {width}")
    first = group[0]
    strides = (first.pages.stride(0), first.ranks.stride(0))
    for m in group:
        if (m.pages.stride(0), m.ranks.stride(0)) != strides or m.y.stride(-1) != 1:
            raise ValueError("the group's tables differ in strides, or an output row is strided")
    m3 = [*group, *[first] * (MAX_GROUP - len(group))]  # unused members: never launched
    n = tokens.numel()
    _bgmv_shrink[(n, len(group))](
        x, *(m.a for m in m3), xa, tokens, slots, *(m.pages for m in m3),
        *(m.ranks for m in m3), x.shape[1],
        x.stride(0), *(m.a.stride(0) for m in m3), xa.stride(0), *strides,
        WIDTH=width, BLOCK_K=BGMV_BLOCK_K,
    )  # fmt: skip
    widest = max(m.y.shape[1] for m in group)
    _bgmv_expand[(n, len(group), triton.cdiv(widest, BGMV_BLOCK_N))](
        xa, *(m.bt for m in m3), *(m.y for m in m3), tokens, slots,
        *(m.pages for m in m3), *(m.ranks for m in m3), *(m.y.shape[1] for m in m3),
        xa.stride(0), *(m.bt.stride(0) for m in m3), *(m.y.stride(0) for m in m3), *strides,
        WIDTH=width, BLOCK_N=BGMV_BLOCK_N,
    )  # fmt: skip


def sgmv(
    x: torch.Tensor,  # [tokens, in], unit stride in features
    y: torch.Tensor,  # [tokens, out], updated in place
    xa: torch.Tensor,  # [tokens, width] float32 scratch
    starts: torch.Tensor,  # [blocks] int32: first token of each block
    counts: torch.Tensor,  # [blocks] int32: tokens in each block (<= SGMV_BLOCK_M)
    slots: torch.Tensor,  # [blocks] int32
    pages: torch.Tensor,  # [slots, max_rank] int32
    ranks: torch.Tensor,  # [slots] int32 (any stride)
    a: torch.Tensor,  # [pages, in]
    bt: torch.Tensor,  # [pages, out]
) -> None:
    """Shrink then expand for blocks of prefill segments, one program per block (and
    output block)."""
    blocks, width = starts.numel(), xa.shape[1]
    strides = (pages.stride(0), ranks.stride(0))
    ieee = x.dtype == torch.float32
    _sgmv_shrink[(blocks,)](
        x, a, xa, starts, counts, slots, pages, ranks, x.shape[1],
        x.stride(0), a.stride(0), xa.stride(0), *strides,
        WIDTH=width, BLOCK_M=SGMV_BLOCK_M, BLOCK_K=SGMV_BLOCK_K, IEEE=ieee,
    )  # fmt: skip
    _sgmv_expand[(blocks, triton.cdiv(y.shape[1], SGMV_BLOCK_N))](
        xa, bt, y, starts, counts, slots, pages, ranks, y.shape[1],
        xa.stride(0), bt.stride(0), y.stride(0), *strides,
        WIDTH=width, BLOCK_M=SGMV_BLOCK_M, BLOCK_N=SGMV_BLOCK_N, IEEE=ieee,
    )  # fmt: skip


def apply_modules(
    pool: LoraPool,
    module_indices: Sequence[int],
    x: torch.Tensor,  # [tokens, in]
    ys: Sequence[torch.Tensor],  # [tokens, out] each, updated in place
    scratch: torch.Tensor,  # float32, at least tokens * MAX_GROUP * the widest width
    decode: tuple[torch.Tensor, torch.Tensor] | None,  # tokens [n], slots [n]
    blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,  # starts, counts, slots
    widths: Sequence[int],  # per kind: scratch width; 0: no adapter of the batch targets it
) -> None:
    """The modules' deltas (:meth:`vajra.gpu.lora.LoraBatchState.apply_group`): BGMV for the
    decode tokens, up to ``MAX_GROUP`` modules a launch pair; SGMV for the prefill blocks, a
    module at a time."""
    members: list[tuple[Member, int]] = []
    for module_index, y in zip(module_indices, ys, strict=True):
        kind = pool.layout.module_kinds[module_index]
        if width := widths[kind]:  # 0: no adapter of the batch targets the kind
            a, bt = pool.module_views(module_index)
            tables = (pool.page_table[kind], pool.rank_table[:, kind])
            members.append((Member(y, *tables, a, bt), width))
    if not members:
        return
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens = x.shape[0]
    if decode is not None:
        for first in range(0, len(members), MAX_GROUP):
            group = members[first : first + MAX_GROUP]
            width = max(w for _, w in group)
            xa = scratch[: tokens * len(group) * width].view(tokens, len(group) * width)
            bgmv(x, xa, width, *decode, [m for m, _ in group])
    if blocks is not None:
        for m, width in members:
            xa = scratch[: tokens * width].view(tokens, width)
            sgmv(x, m.y, xa, *blocks, m.pages, m.ranks, m.a, m.bt)
