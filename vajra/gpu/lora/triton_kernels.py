# mypy: disable-error-code="no-untyped-def, untyped-decorator, misc"
# (the @triton.jit kernels below take untyped pointers and scalars; the launchers are typed)
"""The Triton path of the multi-LoRA layer: shrink and expand, BGMV and SGMV style.

Semantics: those of :mod:`vajra.gpu.lora.layer`, ``y[t] += (x[t] @ A[s(t)]^T) @ Bt[s(t)]``,
where ``A[s]``/``Bt[s]`` are the rows of the pages the pool's page table lists for slot ``s``
and the module's kind, as many as the rank table says (0: no delta).

* **shrink** ``xa[t, :r] = x[t] @ A_s^T`` and **expand** ``y[t] += xa[t, :r] @ Bt_s``, with
  ``xa`` a float32 ``[tokens, width]`` scratch buffer (``width`` a power of two >= 16 covering
  every rank in the batch; rows past a token's rank are masked, never computed from memory).
* **BGMV** (decode): one program per token (expand: per token and block of outputs), each
  loading its own adapter's rows through the page table.
* **SGMV** (prefill): one program per block of up to ``BLOCK_M`` tokens of one segment (and
  block of outputs for expand), a ``tl.dot`` of the block with the adapter's rows.

One launch of each per layer-module per step covers every adapter of the batch. Accumulation
is in float32; float32 operands use IEEE dot products (no TF32), so the result matches the
torch path to float32 rounding.

Tested in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` set before triton is
imported) against the torch path and a per-token reference; not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

BGMV_BLOCK_K = 128  # input features per shrink step
BGMV_BLOCK_N = 128  # outputs per expand program
SGMV_BLOCK_M = 32  # tokens per SGMV program
SGMV_BLOCK_K = 64
SGMV_BLOCK_N = 64


@triton.jit
def _bgmv_shrink(
    x_ptr,
    a_ptr,
    xa_ptr,
    token_ptr,
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
    BLOCK_K: tl.constexpr,
):
    i = tl.program_id(0)
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
    tl.store(xa_ptr + token * stride_xa + j, acc)


@triton.jit
def _bgmv_expand(
    xa_ptr,
    b_ptr,
    y_ptr,
    token_ptr,
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
    BLOCK_N: tl.constexpr,
):
    i = tl.program_id(0)
    token = tl.load(token_ptr + i).to(tl.int64)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    rank = tl.load(rank_ptr + slot * stride_rank)
    if rank == 0:
        return
    j = tl.arange(0, WIDTH)
    live = j < rank
    pages = tl.load(page_ptr + slot * stride_page + j, mask=live, other=0).to(tl.int64)
    xa = tl.load(xa_ptr + token * stride_xa + j, mask=live, other=0.0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
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


def bgmv(
    x: torch.Tensor,  # [tokens, in], unit stride in features
    y: torch.Tensor,  # [tokens, out], updated in place
    xa: torch.Tensor,  # [tokens, width] float32 scratch
    tokens: torch.Tensor,  # [n] int32
    slots: torch.Tensor,  # [n] int32
    pages: torch.Tensor,  # [slots, max_rank] int32: the page table of the module's kind
    ranks: torch.Tensor,  # [slots] int32 (any stride): the rank table of the module's kind
    a: torch.Tensor,  # [pages, in]
    bt: torch.Tensor,  # [pages, out]
) -> None:
    """Shrink then expand for decode tokens, one program per token (and output block)."""
    n, width = tokens.numel(), xa.shape[1]
    strides = (pages.stride(0), ranks.stride(0))
    _bgmv_shrink[(n,)](
        x, a, xa, tokens, slots, pages, ranks, x.shape[1],
        x.stride(0), a.stride(0), xa.stride(0), *strides,
        WIDTH=width, BLOCK_K=BGMV_BLOCK_K,
    )  # fmt: skip
    _bgmv_expand[(n, triton.cdiv(y.shape[1], BGMV_BLOCK_N))](
        xa, bt, y, tokens, slots, pages, ranks, y.shape[1],
        xa.stride(0), bt.stride(0), y.stride(0), *strides,
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
