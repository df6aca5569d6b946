# mypy: disable-error-code="no-untyped-def, untyped-decorator, misc"
# (the @triton.jit kernels below take untyped pointers and scalars; the launcher is typed)
# Over 400 lines: the kernels, their launch plan and launcher, and the torch reference they are
# tested against share one layout and one semantics, read together.
"""Paged decode attention in Triton: each decode row reads its keys and values straight from
the paged cache through its block table, with no gathered temporary.

Semantics: for each row ``d`` and query head ``h``, with ``g = h // (heads // kv_heads)`` and
``K_d[p] = k_blocks[tables[d, p // block_size], p % block_size, g]`` (``V_d`` alike)::

    out[d, h] = softmax_p((q[d, h] . K_d[p]) * scale for p < lens[d]) @ V_d[: lens[d]]

which is what ``scaled_dot_product_attention(..., enable_gqa=True)`` gives on the gathered
context masked past each row's length (:func:`paged_decode_attention_reference`, the torch
path of :mod:`vajra.gpu.paged_attention`). The cache layout is that module's: per layer ``k``
and ``v`` are ``[num_blocks, block_size, kv_heads, head_dim]``.

Shape of the work (flash-decoding): one program per (row, kv head, split). A row's positions
``0 .. lens[d] - 1`` are cut into ``splits`` contiguous ranges, one per program, so that a
batch of few rows or long contexts still fills the GPU; a program loads the queries of every
head that shares its kv head (padded to a power of two), walks its range ``tile`` positions at
a time (a tile may span several cache blocks: each position looks up its block), and keeps an
online softmax. With one split it writes the output; with more it writes its running max, sum
and weighted values in float32, and a second, small kernel combines a row's splits. Every key
and value of a row is read exactly once. Scores, softmax and sums are float32 whatever the
input dtype (float32, float16 or bfloat16); the products are elementwise multiply-and-sum
rather than ``tl.dot``, so they compile for any group, block and head size (no 16-row minimum,
no TF32) at the price of tensor-core throughput, which decode, bound by memory, barely uses.
Table entries past a row's length are never read. The launch reads only shapes on the host
(no device sync), so it can be captured in a CUDA graph (:mod:`vajra.gpu.decode_graphs`).

With ``new_k`` and ``new_v`` (the step's key and value of each row, ``[D, kv_heads,
head_dim]``), the kernel also writes them into the cache at each row's last position
``lens[d] - 1`` (its slot through the block table), which the engine's decode rows would
otherwise need a launch of :mod:`vajra.gpu.kv_write_kernel` for. The program whose range holds
that position uses the new key and value there, whatever the cache holds while it reads, and
writes them at its end; no other program reads that position, so no program waits for
another's write, and no order between its own loads and that store matters.

:func:`launch_plan` picks ``splits``, ``tile`` and ``num_warps`` from the shapes alone (the
lengths live on the device); ``vajra bench decode-kernel`` times the alternatives on a GPU.
Tested in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` set before triton is
imported) against the reference, for one and several splits and tiles that span blocks; the
CUDA test compares bfloat16, float16 and float32 against it on the device.

Not done here: prefill chunks (they go through torch's attention on a gathered context).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch.nn import functional as F

try:
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
    from triton.compiler.errors import CompilationError  # type: ignore[import-untyped]
    from triton.runtime.errors import OutOfResources  # type: ignore[import-untyped]
except ImportError:  # the torch path serves; paged_decode_attention says why it cannot
    _HAVE_TRITON = False
    BUILD_ERRORS: tuple[type[Exception], ...] = ()
else:
    _HAVE_TRITON = True
    #: What a launch raises when this Triton, or this device, cannot build a plan's kernels
    #: (the caller can then serve with the torch path).
    BUILD_ERRORS = (CompilationError, OutOfResources)

_LOG2E = 1.4426950408889634
#: Programs per streaming multiprocessor that :func:`launch_plan` aims for.
PROGRAMS_PER_SM = 4
MAX_SPLITS = 16
#: Elements of the [group, tile, head_dim] product a program holds per warp.
ELEMENTS_PER_WARP = 2048


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    splits: int  # programs per (row, kv head), a power of two
    tile: int  # positions a program reads per iteration, a power of two
    num_warps: int


def available(device: torch.device | str) -> bool:
    """Whether :func:`paged_decode_attention` can run on ``device``: a CUDA device with triton
    importable. Callers use :func:`paged_decode_attention_reference` (or their own torch
    path) otherwise."""
    return torch.device(device).type == "cuda" and _HAVE_TRITON


def launch_plan(
    rows: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    max_positions: int,
    processors: int,
) -> LaunchPlan:
    """Splits, tile and warps from shapes alone: enough (row, kv head, split) programs for
    ``PROGRAMS_PER_SM`` per processor, but no split shorter than two tiles of the longest
    possible row (``max_positions``: the table's width in positions); a tile as wide as a
    program's registers allow (``ELEMENTS_PER_WARP`` of the group x tile x head product)."""
    group_p = _pow2(max(1, heads // max(1, kv_heads)))
    head_p = _pow2(head_dim)
    num_warps = 4 if group_p * head_p <= 256 else 8
    tile = max(16, min(128, _pow2_floor(ELEMENTS_PER_WARP * num_warps // (group_p * head_p))))
    wanted = -(-PROGRAMS_PER_SM * processors // max(1, rows * kv_heads))
    longest = max(1, max_positions // (2 * tile))
    splits = min(_pow2(wanted), _pow2_floor(longest), MAX_SPLITS)
    return LaunchPlan(splits=max(1, splits), tile=tile, num_warps=num_warps)


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
    plan: LaunchPlan | None = None,
    out: torch.Tensor | None = None,
    new_k: torch.Tensor | None = None,  # [D, kv_heads, head_dim], any strides
    new_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton kernels (see the module docstring); returns ``[D, heads, head_dim]`` of
    ``q``'s dtype: ``out`` when given (its last dimension contiguous; the caller's buffer, so
    no copy follows), else a new tensor. No synchronisation with the host; with several
    splits, float32 partials of ``D x heads x splits x (head_dim + 2)``. ``plan`` defaults to
    :func:`launch_plan`'s. ``new_k`` and ``new_v``, together or not at all: used at, and
    written into the cache at, each row's last position (module docstring). Lengths are not checked
    against the table width on the device: a length past it reads whatever ids follow the
    row."""
    if not _HAVE_TRITON:
        raise RuntimeError("paged_decode_attention needs triton, which does not import here")
    _check(q, k_blocks, v_blocks, tables, lens)
    rows, heads, head_dim = q.shape
    _, size, kv_heads, _ = k_blocks.shape
    write = new_k is not None or new_v is not None
    if write:
        for new in (new_k, new_v):
            if new is None or new.shape != (rows, kv_heads, head_dim) or new.dtype != q.dtype:
                raise ValueError(
                    f"new_k and new_v must both be [{rows}, {kv_heads}, {head_dim}] {q.dtype}"
                )
    new_k = new_k if new_k is not None else q  # unread without a write (WRITE=False)
    new_v = new_v if new_v is not None else q
    if out is None:
        out = torch.empty((rows, heads, head_dim), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} for q {tuple(q.shape)} {q.dtype}")
    if rows == 0:
        return out
    if plan is None:
        width = tables.shape[1] * size
        plan = launch_plan(rows, heads, kv_heads, head_dim, width, processor_count(q.device))
    if plan.splits < 1 or plan.splits & (plan.splits - 1) or plan.tile & (plan.tile - 1):
        raise ValueError(f"splits and tile must be powers of two, got {plan}")
    group = heads // kv_heads
    maxes = sums = values = out  # one split writes the output directly
    if plan.splits > 1:
        partial = (rows, heads, plan.splits)
        maxes = torch.empty(partial, dtype=torch.float32, device=q.device)
        sums = torch.empty(partial, dtype=torch.float32, device=q.device)
        values = torch.empty((*partial, head_dim), dtype=torch.float32, device=q.device)
    _paged_decode[(rows, kv_heads, plan.splits)](
        q, k_blocks, v_blocks, tables, lens, out, maxes, sums, values, new_k, new_v,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        k_blocks.stride(0), k_blocks.stride(1), k_blocks.stride(2), k_blocks.stride(3),
        v_blocks.stride(0), v_blocks.stride(1), v_blocks.stride(2), v_blocks.stride(3),
        tables.stride(0), tables.stride(1), lens.stride(0),
        out.stride(0), out.stride(1),
        new_k.stride(0), new_k.stride(1), new_k.stride(2),
        new_v.stride(0), new_v.stride(1), new_v.stride(2),
        GROUP=group,
        GROUP_P=triton.next_power_of_2(group),
        BLOCK_SIZE=size,
        TILE=plan.tile,
        HEAD_DIM=head_dim,
        HEAD_P=triton.next_power_of_2(head_dim),
        SPLITS=plan.splits,
        WRITE=write,
        num_warps=plan.num_warps,
    )  # fmt: skip
    if plan.splits > 1:
        _combine_splits[(rows, heads)](
            maxes, sums, values, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_P=triton.next_power_of_2(head_dim),
            SPLITS=plan.splits,
            num_warps=4,
        )  # fmt: skip
    return out


@cache
def processor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in elsewhere (the
    interpreter), so that the CPU tests still take the several-split path."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


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
        max_ptr,  # [rows, heads, SPLITS] float32 partials (unused with one split)
        sum_ptr,
        value_ptr,  # [rows, heads, SPLITS, HEAD_DIM]
        new_k_ptr,  # [rows, kv_heads, HEAD_DIM]: each row's key at its last position (WRITE)
        new_v_ptr,
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
        stride_nkd,
        stride_nkh,
        stride_nkx,
        stride_nvd,
        stride_nvh,
        stride_nvx,
        GROUP: tl.constexpr,  # query heads per kv head
        GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
        BLOCK_SIZE: tl.constexpr,  # positions per cache block
        TILE: tl.constexpr,  # positions per iteration, a power of two
        HEAD_DIM: tl.constexpr,
        HEAD_P: tl.constexpr,
        SPLITS: tl.constexpr,
        WRITE: tl.constexpr,  # write new_k and new_v at each row's last position
    ):
        row = tl.program_id(0).to(tl.int64)
        kv_head = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        length = tl.load(len_ptr + row * stride_len)
        # this program's positions: [lo, hi), whole tiles but the last
        chunk = tl.cdiv(tl.cdiv(length, SPLITS), TILE) * TILE
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)

        g = tl.arange(0, GROUP_P)
        x = tl.arange(0, HEAD_P)
        t = tl.arange(0, TILE)
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
        table_row = table_ptr + row * stride_td
        last = length - 1
        if WRITE:  # the row's new key and value, used at ``last`` and written there at the end
            k_last = tl.load(
                new_k_ptr + row * stride_nkd + kv_head * stride_nkh + x * stride_nkx, mask=x_in
            )
            v_last = tl.load(
                new_v_ptr + row * stride_nvd + kv_head * stride_nvh + x * stride_nvx, mask=x_in
            )
        for start in range(lo, hi, TILE):
            pos = start + t  # [TILE]
            live = pos < hi
            block = tl.load(table_row + (pos // BLOCK_SIZE) * stride_tw, mask=live, other=0)
            block = block.to(tl.int64)
            offset = pos % BLOCK_SIZE
            kv_in = live[:, None] & x_in[None, :]
            k = tl.load(
                k_row
                + block[:, None] * stride_kb
                + offset[:, None] * stride_kp
                + x[None, :] * stride_kx,
                mask=kv_in,
                other=0.0,
            ).to(tl.float32)  # [TILE, HEAD_P]
            v = tl.load(
                v_row
                + block[:, None] * stride_vb
                + offset[:, None] * stride_vp
                + x[None, :] * stride_vx,
                mask=kv_in,
                other=0.0,
            ).to(tl.float32)
            if WRITE:  # the cache holds an older value at ``last`` until the end
                is_last = (pos == last)[:, None]
                k = tl.where(is_last, k_last.to(tl.float32)[None, :], k)
                v = tl.where(is_last, v_last.to(tl.float32)[None, :], v)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale_log2
            scores = tl.where(live[None, :], scores, float("-inf"))  # [GROUP_P, TILE]
            # Every iteration has a live position, so m is finite from the first one on.
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp2(m - m_new)
            weights = tl.exp2(scores - m_new[:, None])
            total = total * alpha + tl.sum(weights, axis=1)
            acc = acc * alpha[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
            m = m_new

        if WRITE:  # by the program whose range holds ``last``, after its reads
            at_last = x * 0 + last  # [HEAD_P]: a vector mask (the interpreter wants one)
            owner = x_in & (lo <= at_last) & (at_last < hi)
            block = tl.load(table_row + (last // BLOCK_SIZE) * stride_tw).to(tl.int64)
            offset = last % BLOCK_SIZE
            k_at = k_row + block * stride_kb + offset * stride_kp + x * stride_kx
            tl.store(k_at, k_last, mask=owner)
            tl.store(
                v_row + block * stride_vb + offset * stride_vp + x * stride_vx, v_last, mask=owner
            )

        if SPLITS == 1:
            result = acc / total[:, None]
            tl.store(
                out_ptr + row * stride_od + heads[:, None] * stride_oh + x[None, :],
                result.to(out_ptr.dtype.element_ty),
                mask=g_in[:, None] & x_in[None, :],
            )
        else:
            # An empty split (its range starts past the row's length) leaves m = -inf, 0, 0.
            at = (row * (GROUP * tl.num_programs(1)) + heads) * SPLITS + split  # [GROUP_P]
            tl.store(max_ptr + at, m, mask=g_in)
            tl.store(sum_ptr + at, total, mask=g_in)
            tl.store(
                value_ptr + at[:, None] * HEAD_DIM + x[None, :],
                acc,
                mask=g_in[:, None] & x_in[None, :],
            )

    @triton.jit
    def _combine_splits(
        max_ptr,
        sum_ptr,
        value_ptr,
        out_ptr,
        stride_od,
        stride_oh,
        HEAD_DIM: tl.constexpr,
        HEAD_P: tl.constexpr,
        SPLITS: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1).to(tl.int64)
        s = tl.arange(0, SPLITS)
        x = tl.arange(0, HEAD_P)
        x_in = x < HEAD_DIM
        at = (row * tl.num_programs(1) + head) * SPLITS + s  # [SPLITS]
        m = tl.load(max_ptr + at)
        # Split 0 holds position 0 (lens >= 1), so the largest max is finite.
        scale = tl.exp2(m - tl.max(m, axis=0))  # 0 for an empty split
        total = tl.sum(tl.load(sum_ptr + at) * scale, axis=0)
        values = tl.load(value_ptr + at[:, None] * HEAD_DIM + x[None, :], mask=x_in[None, :])
        result = tl.sum(values * scale[:, None], axis=0) / total
        tl.store(
            out_ptr + row * stride_od + head * stride_oh + x,
            result.to(out_ptr.dtype.element_ty),
            mask=x_in,
        )
