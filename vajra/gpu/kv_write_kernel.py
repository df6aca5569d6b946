# mypy: disable-error-code="no-untyped-def, untyped-decorator, misc"
# (the @triton.jit kernel below takes untyped pointers and scalars; the launcher is typed)
"""A step's new keys and values into the paged cache, both in one Triton kernel.

Semantics: for each token ``t`` of the step, with ``s = slots[t]`` (``block * block_size +
offset``)::

    k_blocks.view(-1, kv_heads, head_dim)[s] = new_k[t]
    v_blocks.view(-1, kv_heads, head_dim)[s] = new_v[t]

which is what the torch path of :mod:`vajra.gpu.paged_attention` does with two
``index_copy_`` calls, one kernel each. On CUDA it writes the prefill chunks' tokens: the
decode rows' are written by the decode attention kernel itself
(:mod:`vajra.gpu.paged_decode_kernel`). Here one program per token writes both; the inputs
may have any strides (the key from the rotary kernel, the value a view of the merged query,
key and value projection of :mod:`vajra.gpu.fused_layers`), so nothing is made contiguous
first. The launch reads only shapes on the host, so a CUDA graph captures it
(:mod:`vajra.gpu.decode_graphs`). Tested in Triton's interpreter against ``index_copy_``
(``tests/gpu/test_kv_write_kernel.py``).
"""

from __future__ import annotations

import torch

try:
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError:
    _HAVE_TRITON = False
else:
    _HAVE_TRITON = True


def write_kv(
    k_blocks: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim], contiguous
    v_blocks: torch.Tensor,  # the same shape and dtype
    slots: torch.Tensor,  # [T] int64 cache slots
    new_k: torch.Tensor,  # [T, kv_heads, head_dim], any strides, the cache's dtype
    new_v: torch.Tensor,
) -> None:
    """Write the step's keys and values to their slots (module docstring); raises
    ValueError for shapes, dtypes or layouts that do not match."""
    if not _HAVE_TRITON:
        raise RuntimeError("write_kv needs triton, which does not import here")
    _, _, kv_heads, head_dim = k_blocks.shape
    tokens = slots.shape[0]
    for cache in (k_blocks, v_blocks):
        if cache.shape != k_blocks.shape or cache.dtype != k_blocks.dtype:
            raise ValueError(f"caches {tuple(k_blocks.shape)} and {tuple(v_blocks.shape)} differ")
        if not cache.is_contiguous():
            raise ValueError("the cache blocks must be contiguous")
    for new in (new_k, new_v):
        if new.shape != (tokens, kv_heads, head_dim) or new.dtype != k_blocks.dtype:
            raise ValueError(
                f"{tuple(new.shape)} {new.dtype} for {tokens} slots of "
                f"{kv_heads} x {head_dim} {k_blocks.dtype}"
            )
    if slots.dtype != torch.int64 or slots.dim() != 1:
        raise ValueError(
            f"slots must be one int64 dimension, not {slots.dtype} {tuple(slots.shape)}"
        )
    if not tokens:
        return
    _write_kv[(tokens,)](
        new_k, new_v, k_blocks, v_blocks, slots,
        *new_k.stride(), *new_v.stride(),
        HEADS=kv_heads,
        HEADS_P=triton.next_power_of_2(kv_heads),
        DIM=head_dim,
        DIM_P=triton.next_power_of_2(head_dim),
        num_warps=1 if kv_heads * head_dim <= 512 else 4,
    )  # fmt: skip


if _HAVE_TRITON:

    @triton.jit
    def _write_kv(k_ptr, v_ptr, k_cache, v_cache, slots_ptr,
                  ks0, ks1, ks2, vs0, vs1, vs2,
                  HEADS: tl.constexpr, HEADS_P: tl.constexpr,
                  DIM: tl.constexpr, DIM_P: tl.constexpr):  # fmt: skip
        t = tl.program_id(0)
        slot = tl.load(slots_ptr + t)
        h = tl.arange(0, HEADS_P)[:, None]
        d = tl.arange(0, DIM_P)[None, :]
        keep = (h < HEADS) & (d < DIM)
        at = slot * (HEADS * DIM) + h * DIM + d
        k = tl.load(k_ptr + t * ks0 + h * ks1 + d * ks2, mask=keep)
        tl.store(k_cache + at, k, mask=keep)
        v = tl.load(v_ptr + t * vs0 + h * vs1 + d * vs2, mask=keep)
        tl.store(v_cache + at, v, mask=keep)
