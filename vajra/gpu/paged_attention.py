"""The paged KV cache's memory and the attention function that reads and writes it.

Borrowed from transformers, and why: the model itself (its layers, RoPE and projections) runs
unchanged through transformers' public ``AttentionInterface``: this module registers one
attention function under :data:`ATTENTION_NAME` and the engine switches the loaded model to
it. transformers then builds no mask and keeps no cache of its own (the engine passes no
``cache`` / ``past_key_values`` at all, so the deprecated argument is never used). The
continuous-batching loop of ``transformers.generation.continuous_batching`` is not used:
measured on a 2-core CPU it ran at a tenth of a static ``generate``; its paged cache's layout
(blocks of token positions per layer, addressed through per-request block tables) is the one
used here.

Layout: per layer, ``k`` and ``v`` are ``[num_blocks, block_size, kv_heads, head_dim]``,
allocated once. A step's input is ONE packed sequence of ``T`` tokens (no padding): first one
decode token for each of ``D`` running requests, then the prefill chunks of requests that are
still reading their prompt. For each layer the function

1. writes the step's new keys and values to their slots (``slot_mapping[t] = block * size +
   offset`` of token ``t``): the only KV written, and only the step's own positions;
2. attends each decode token to its request's positions ``0 .. ctx - 1`` through its block
   table (one batched ``scaled_dot_product_attention`` for all decode tokens, masked past each
   request's length), and each prefill chunk causally to its request's positions ``0 ..
   end - 1`` (a chunk with no earlier context attends to its own keys directly).

Decode attention reads each request's blocks in place on CUDA (the Triton kernel of
:mod:`vajra.gpu.paged_decode_kernel`, one launch for every decode row, writing its rows of the
output in place, and the decode rows' new keys and values into the cache), and there the
prefill chunks' keys and values are written by one kernel for both
(:mod:`vajra.gpu.kv_write_kernel`); a decode-only step launches no KV write of its own. If
either kernel cannot be built, torch serves both from then on. On the CPU, and for prefill
chunks with earlier context, a request's blocks are gathered into a temporary for torch's
attention (eager torch has no paged kernel); decode rows are grouped by length so the padding
of a group stays within 1.5x. Nothing else is copied, and no other request's KV is touched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F
from transformers import AttentionInterface

from vajra.gpu.kv_write_kernel import write_kv

ATTENTION_NAME = "vajra_paged"


@dataclass(frozen=True, slots=True)
class KvShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.kv_heads * self.head_dim * element

    @classmethod
    def of_model(cls, model: Any) -> KvShape:
        config = model.config
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        dtype = next(model.parameters()).dtype
        return cls(int(config.num_hidden_layers), kv_heads, head_dim, dtype)


class KvCache:
    """Every layer's key and value blocks, allocated once."""

    def __init__(
        self, shape: KvShape, num_blocks: int, block_size: int, device: torch.device
    ) -> None:
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        dims = (num_blocks, block_size, shape.kv_heads, shape.head_dim)
        self.k = [
            torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)
        ]
        self.v = [
            torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.num_layers)
        ]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@dataclass(slots=True)
class Chunk:
    """One request's prefill chunk in the packed step: tokens ``[start, start + length)`` of
    the step, positions ``[pos, pos + length)`` of the request; ``table`` its block ids (a
    device tensor covering positions ``0 .. pos + length - 1``)."""

    start: int
    length: int
    pos: int
    table: torch.Tensor


@dataclass(slots=True)
class StepLayout:
    """What the attention function needs to know about the packed step (device tensors)."""

    num_tokens: int
    slot_mapping: torch.Tensor  # [T] int64
    num_decode: int = 0
    decode_tables: torch.Tensor | None = None  # [D, max_blocks] int64
    decode_lens: torch.Tensor | None = None  # [D] int64: context length incl. the new token
    # (first row, end row, longest length) per group of decode rows attended together
    decode_groups: list[tuple[int, int, int]] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    # Built by the first layer from the above, read by the others.
    decode_inputs: list[tuple[int, int, torch.Tensor, torch.Tensor]] | None = None


class _Active(threading.local):
    cache: KvCache | None = None
    layout: StepLayout | None = None


_active = _Active()


@contextmanager
def running_step(cache: KvCache, layout: StepLayout) -> Iterator[None]:
    """Make ``cache`` and ``layout`` what the attention function reads, on this thread, for
    the duration of one forward."""
    _active.cache, _active.layout = cache, layout
    try:
        yield
    finally:
        _active.cache, _active.layout = None, None


def paged_attention(
    module: Any,
    query: torch.Tensor,  # [1, heads, T, head_dim], RoPE applied
    key: torch.Tensor,  # [1, kv_heads, T, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function over the paged cache (see the module docstring);
    returns ``[1, T, heads, head_dim]``."""
    cache, layout = _active.cache, _active.layout
    if cache is None or layout is None:
        raise RuntimeError("paged attention called outside an engine step")
    layer = int(module.layer_idx)
    k_blocks, v_blocks = cache.k[layer], cache.v[layer]
    kv_heads, head_dim = k_blocks.shape[2], k_blocks.shape[3]
    new_k = key[0].transpose(0, 1)  # [T, kv_heads, D]
    new_v = value[0].transpose(0, 1)
    d = layout.num_decode
    kernel = _kernel_for(query.device)
    # Where the decode kernel runs, it writes the decode rows' keys and values itself, and the
    # chunks' go in one kernel for both; torch's index_copy_ otherwise.
    if kernel is not None and layout.num_tokens > d:
        try:
            write_kv(k_blocks, v_blocks, layout.slot_mapping[d:], new_k[d:], new_v[d:])
        except _build_errors() as exc:  # this Triton or device cannot build it: torch serves
            _kernel_failed(query.device, exc)
            kernel = None
    if kernel is None:
        _copy_kv(k_blocks, v_blocks, layout.slot_mapping, new_k, new_v)

    q = query[0]  # [heads, T, D]
    out = query.new_empty((layout.num_tokens, q.shape[0], head_dim))
    size = cache.block_size
    if d and kernel is not None:
        assert layout.decode_tables is not None and layout.decode_lens is not None
        try:
            kernel(
                q[:, :d].transpose(0, 1),
                k_blocks,
                v_blocks,
                layout.decode_tables,
                layout.decode_lens,
                scaling if scaling is not None else head_dim**-0.5,
                out=out[:d],  # written in place: no copy after
                new_k=new_k[:d],
                new_v=new_v[:d],
            )
        except _build_errors() as exc:  # this Triton or device cannot build it: torch serves
            _kernel_failed(q.device, exc)
            kernel = None  # it wrote nothing: the decode rows' keys and values as torch does
            _copy_kv(k_blocks, v_blocks, layout.slot_mapping[:d], new_k[:d], new_v[:d])
    if d and kernel is None:
        assert layout.decode_tables is not None and layout.decode_lens is not None
        qd = q[:, :d].transpose(0, 1).unsqueeze(2)  # [D, heads, 1, head_dim]
        for first, end, flat, mask in _decode_inputs(layout, size):
            rows = end - first
            ks = k_blocks.index_select(0, flat).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
            vs = v_blocks.index_select(0, flat).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
            attended = F.scaled_dot_product_attention(
                qd[first:end], ks, vs, attn_mask=mask, scale=scaling, enable_gqa=True
            )
            out[first:end] = attended[:, :, 0]
    for chunk in layout.chunks:
        s, n = chunk.start, chunk.length
        qc = q[:, s : s + n].unsqueeze(0)  # [1, heads, n, D]
        if chunk.pos == 0:
            kc = key[:, :, s : s + n]
            vc = value[:, :, s : s + n]
            attended = F.scaled_dot_product_attention(
                qc, kc, vc, is_causal=True, scale=scaling, enable_gqa=True
            )
        else:
            end = chunk.pos + n
            width = -(-end // size)
            kc = k_blocks[chunk.table[:width]].reshape(width * size, kv_heads, head_dim)[:end]
            vc = v_blocks[chunk.table[:width]].reshape(width * size, kv_heads, head_dim)[:end]
            qpos = torch.arange(chunk.pos, end, device=q.device)
            mask = torch.arange(end, device=q.device)[None, :] <= qpos[:, None]
            attended = F.scaled_dot_product_attention(
                qc,
                kc.transpose(0, 1).unsqueeze(0),
                vc.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                scale=scaling,
                enable_gqa=True,
            )
        out[s : s + n] = attended[0].transpose(0, 1)
    return out.unsqueeze(0), None


def kv_blocks_for_budget(
    shape: KvShape,
    device: torch.device,
    block_size: int,
    kv_cache_bytes: int | None,
    fraction: float,
    cpu_tokens: int,
) -> int:
    """How many blocks the KV budget buys: ``kv_cache_bytes`` if given; on CUDA ``fraction``
    of the free device memory; on the CPU room for ``cpu_tokens`` positions, at most 1 GiB."""
    per_block = shape.bytes_per_token * block_size
    if kv_cache_bytes is not None:
        budget = kv_cache_bytes
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * fraction)
    else:
        budget = min(cpu_tokens * shape.bytes_per_token, _CPU_KV_LIMIT)
    return max(1, budget // per_block)


_CPU_KV_LIMIT = 1 << 30


def _copy_kv(
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    slots: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
) -> None:
    """The torch path's KV write: each token's key and value into its slot."""
    _, _, kv_heads, head_dim = k_blocks.shape
    k_blocks.view(-1, kv_heads, head_dim).index_copy_(0, slots, new_k)
    v_blocks.view(-1, kv_heads, head_dim).index_copy_(0, slots, new_v)


def _decode_inputs(
    layout: StepLayout, size: int
) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """Per group of decode rows: its rows, its block ids flattened (row-major), and its mask
    [rows, 1, 1, positions]; the same for every layer, so built once per step."""
    if layout.decode_inputs is None:
        assert layout.decode_tables is not None and layout.decode_lens is not None
        built = []
        for first, end, longest in layout.decode_groups:
            width = -(-longest // size)
            flat = layout.decode_tables[first:end, :width].reshape(-1)
            positions = torch.arange(width * size, device=flat.device)
            mask = (positions[None, :] < layout.decode_lens[first:end, None])[:, None, None, :]
            built.append((first, end, flat, mask))
        layout.decode_inputs = built
    return layout.decode_inputs


_kernels: dict[torch.device, Any] = {}
_kernel_errors: dict[torch.device, str] = {}
log = logging.getLogger(__name__)


def decode_kernel_error(device: torch.device | str) -> str | None:
    """Why the Triton decode kernel could not be built on ``device``, where it could not (the
    torch path serves that device's decode rows from then on); None otherwise."""
    return _kernel_errors.get(torch.device(device))


def _build_errors() -> tuple[type[Exception], ...]:
    from vajra.gpu import paged_decode_kernel

    return paged_decode_kernel.BUILD_ERRORS


def _kernel_failed(device: torch.device, exc: Exception) -> None:
    _kernels[device] = None
    _kernel_errors[device] = f"{type(exc).__name__}: {exc}"[:2000]
    log.error("paged attention kernels failed to build on %s, torch serves: %s", device, exc)


def _kernel_for(device: torch.device) -> Any:
    """The Triton paged decode kernel on CUDA (it reads each request's blocks in place, where
    the torch path gathers them first); None on the CPU or without triton."""
    if device not in _kernels:
        kernel = None
        if device.type == "cuda":
            from vajra.gpu import paged_decode_kernel

            if paged_decode_kernel.available(device):
                kernel = paged_decode_kernel.paged_decode_attention
        _kernels[device] = kernel
    return _kernels[device]


AttentionInterface.register(ATTENTION_NAME, paged_attention)


def use_paged_attention(model: Any) -> None:
    """Switch a loaded transformers model to :func:`paged_attention`."""
    model.set_attn_implementation(ATTENTION_NAME)
