# mypy: disable-error-code="no-untyped-def, untyped-decorator, misc"
# (the @triton.jit kernel below takes untyped pointers and scalars; the launcher is typed)
"""Paged decode attention as one Triton kernel: each decode row reads its keys and values
straight from the paged cache through its block table, with no gathered temporary.

Semantics: for each row ``d`` and query head ``h``, with ``g = h // (heads // kv_heads)`` and
``K_d[p] = k_blocks[tables[d, p // block_size], p % block_size, g]`` (``V_d`` alike)::

    out[d, h] = softmax_p((q[d, h] . K_d[p]) * scale for p < lens[d]) @ V_d[: lens[d]]

which is what ``scaled_dot_product_attention(..., enable_gqa=True)`` gives on the gathered
context masked past each row's length (:func:`paged_decode_attention_reference`, the path of
:mod:`vajra.gpu.paged_attention` today). The cache layout is that module's: per layer ``k`` and
``v`` are ``[num_blocks, block_size, kv_heads, head_dim]``.

Shape of the kernel: one launch for all rows, one program per (row, kv head). A program loads
the queries of every head that shares its kv head (padded to a power of two), walks the row's
blocks ``0 .. ceil(lens[d] / block_size) - 1`` with an online softmax, and reads each key and
value of the row exactly once. Scores, softmax and the weighted sum are float32 whatever the
input dtype (float32, float16 or bfloat16); the products are elementwise multiply-and-sum
rather than ``tl.dot``, so they compile for any group, block and head size (no 16-row minimum,
no TF32) at the price of tensor-core throughput, which decode, bound by memory, barely uses.
Table entries past a row's blocks are never read.

Tested in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` set before triton is
imported) against :func:`paged_decode_attention_reference`; not yet run on a GPU. Its test
file holds a CUDA check (bfloat16 against the reference) that has not been run either.

Not done here: splitting a long row's blocks across programs (flash-decoding), which a batch
of few rows with long contexts would need to fill the GPU; prefill chunks.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

try:
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError:  # the torch path serves; paged_decode_attention says why it cannot
    _HAVE_TRITON = False
else:
    _HAVE_TRITON = True

NUM_WARPS = 4
_LOG2E = 1.4426950408889634


def available(device: torch.device | str) -> bool:
    """Whether :func:`paged_decode_attention` can run on ``device``: a CUDA device with triton
    importable. Callers use :func:`paged_decode_attention_reference` (or their own torch
    path) otherwise."""
    return torch.device(device).type == "cuda" and _HAVE_TRITON


def paged_decode_attention_reference(
    q: torch.Tensor,  # [D, heads, head_dim]
    k_blocks: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_blocks: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    tables: torch.Tensor,  # [D, W] int64 block ids
    lens: torch.Tensor,  # [D] int64, each in 1 .. W * block_size
    scale: float,
) -> torch.Tensor:
    """The torch path: gather every row's ``W`` blocks into a temporary and run one masked
    ``scaled_dot_product_attention`` over them; returns ``[D, heads, head_dim]``."""
    _check(q, k_blocks, v_blocks, tables, lens)
    rows, width = tables.shape
    _, size, kv_heads, head_dim = k_blocks.shape
    ks = k_blocks[tables].reshape(rows, width * size, kv_heads, head_dim).transpose(1, 2)
    vs = v_blocks[tables].reshape(rows, width * size, kv_heads, head_dim).transpose(1, 2)
    positions = torch.arange(width * size, device=q.device)
    mask = (positions[None, :] < lens[:, None])[:, None, None, :]  # [D, 1, 1, W * size]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return out[:, :, 0]


def paged_decode_attention(
    q: torch.Tensor,  # [D, heads, head_dim], any strides
    k_blocks: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], any strides
    v_blocks: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], any strides
    tables: torch.Tensor,  # [D, W] int64 block ids
    lens: torch.Tensor,  # [D] int64, each in 1 .. W * block_size
    scale: float,
) -> torch.Tensor:
    """The Triton kernel (see the module docstring); returns a new ``[D, heads, head_dim]``
    tensor of ``q``'s dtype. One launch, no synchronisation with the host, no temporaries.
    Lengths are not checked against the table width on the device: a length past it reads
    whatever ids follow the row."""
    if not _HAVE_TRITON:
        raise RuntimeError("paged_decode_attention needs triton, which does not import here")
    _check(q, k_blocks, v_blocks, tables, lens)
    rows, heads, head_dim = q.shape
    _, size, kv_heads, _ = k_blocks.shape
    out = torch.empty((rows, heads, head_dim), dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    group = heads // kv_heads
    _paged_decode[(rows, kv_heads)](
        q, k_blocks, v_blocks, tables, lens, out,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_blocks.stride(0), k_blocks.stride(1), k_blocks.stride(2), k_blocks.stride(3),
        v_blocks.stride(0), v_blocks.stride(1), v_blocks.stride(2), v_blocks.stride(3),
        tables.stride(0), tables.stride(1), lens.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group,
        GROUP_P=triton.next_power_of_2(group),
        BLOCK_SIZE=size,
        BLOCK_P=triton.next_power_of_2(size),
        HEAD_DIM=head_dim,
        HEAD_P=triton.next_power_of_2(head_dim),
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _check(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
) -> None:
    """Shapes, dtypes and devices agree (host-side metadata only: no device sync)."""
    if q.dim() != 3 or k_blocks.dim() != 4:
        raise ValueError(f"q must be 3-d and k_blocks 4-d, got {q.dim()} and {k_blocks.dim()}")
    if v_blocks.shape != k_blocks.shape:
        raise ValueError(f"v_blocks {tuple(v_blocks.shape)} != k_blocks {tuple(k_blocks.shape)}")
    rows, heads, head_dim = q.shape
    kv_heads = k_blocks.shape[2]
    if k_blocks.shape[3] != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and k_blocks ({k_blocks.shape[3]}) differ")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if tables.dim() != 2 or tables.shape[0] != rows or lens.shape != (rows,):
        raise ValueError(
            f"tables must be [{rows}, W] and lens [{rows}], got {tuple(tables.shape)} "
            f"and {tuple(lens.shape)}"
        )
    if tables.dtype != torch.int64 or lens.dtype != torch.int64:
        raise ValueError(f"tables and lens must be int64, got {tables.dtype} and {lens.dtype}")
    if not (q.dtype == k_blocks.dtype == v_blocks.dtype):
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k_blocks.dtype}, v {v_blocks.dtype}")
    devices = {t.device for t in (q, k_blocks, v_blocks, tables, lens)}
    if len(devices) != 1:
        raise ValueError(f"tensors on several devices: {sorted(map(str, devices))}")


if _HAVE_TRITON:

    @triton.jit
    def _paged_decode(
        q_ptr,
        k_ptr,
        v_ptr,
        table_ptr,
        len_ptr,
        out_ptr,
        scale_log2,  # scale * log2(e): the softmax runs in base 2
        stride_qd,
        stride_qh,
        stride_qx,
        stride_kb,
        stride_kp,
        stride_kh,
        stride_kx,
        stride_vb,
        stride_vp,
        stride_vh,
        stride_vx,
        stride_td,
        stride_tw,
        stride_len,
        stride_od,
        stride_oh,
        GROUP: tl.constexpr,  # query heads per kv head
        GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
        BLOCK_SIZE: tl.constexpr,  # positions per cache block
        BLOCK_P: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_P: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        length = tl.load(len_ptr + row * stride_len)
        num_blocks = tl.cdiv(length, BLOCK_SIZE)

        g = tl.arange(0, GROUP_P)
        x = tl.arange(0, HEAD_P)
        p = tl.arange(0, BLOCK_P)
        g_in = g < GROUP
        x_in = x < HEAD_DIM
        heads = kv_head * GROUP + g  # [GROUP_P]
        q = tl.load(
            q_ptr + row * stride_qd + heads[:, None] * stride_qh + x[None, :] * stride_qx,
            mask=g_in[:, None] & x_in[None, :],
            other=0.0,
        ).to(tl.float32)  # [GROUP_P, HEAD_P]

        m = tl.full([GROUP_P], float("-inf"), dtype=tl.float32)  # running max (base-2 units)
        total = tl.zeros([GROUP_P], dtype=tl.float32)  # running sum of exp2(score - m)
        acc = tl.zeros([GROUP_P, HEAD_P], dtype=tl.float32)
        k_row = k_ptr + kv_head * stride_kh
        v_row = v_ptr + kv_head * stride_vh
        for b in range(0, num_blocks):
            block = tl.load(table_ptr + row * stride_td + b * stride_tw).to(tl.int64)
            live = (b * BLOCK_SIZE + p < length) & (p < BLOCK_SIZE)  # [BLOCK_P]
            kv_in = live[:, None] & x_in[None, :]
            k = tl.load(
                k_row + block * stride_kb + p[:, None] * stride_kp + x[None, :] * stride_kx,
                mask=kv_in,
                other=0.0,
            ).to(tl.float32)  # [BLOCK_P, HEAD_P]
            v = tl.load(
                v_row + block * stride_vb + p[:, None] * stride_vp + x[None, :] * stride_vx,
                mask=kv_in,
                other=0.0,
            ).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale_log2
            scores = tl.where(live[None, :], scores, float("-inf"))  # [GROUP_P, BLOCK_P]
            # Block 0 holds position 0 (lens >= 1), so m is finite from the first block on.
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp2(m - m_new)
            weights = tl.exp2(scores - m_new[:, None])
            total = total * alpha + tl.sum(weights, axis=1)
            acc = acc * alpha[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
            m = m_new

        result = acc / total[:, None]
        tl.store(
            out_ptr + row * stride_od + heads[:, None] * stride_oh + x[None, :],
            result.to(out_ptr.dtype.element_ty),
            mask=g_in[:, None] & x_in[None, :],
        )
