"""The packed form of a LoRA adapter: per targeted module kind, its rank rows, in one buffer.

A *module kind* is the last name of a targeted module path (``q_proj``, ``down_proj``, ...).
A *rank row* of kind ``k`` holds row ``j`` of ``A`` and of ``Bt = scale * B^T`` for every
module of that kind: every layer's ``A``, then every layer's ``Bt``. :class:`LoraLayout`
gives each module's ``A`` and ``Bt`` a *segment* of the row (an offset and a width)::

    row_k[j] = [A_l0[j, :in] | A_l1[j, :in] | ... | Bt_l0[j, :out] | Bt_l1[j, :out] | ...]

A *block* of ``n`` rank rows of kind ``k`` is stored segment-major: each segment's ``n``
pieces lie together, as one contiguous ``[n, width]`` matrix at ``n * offset``::

    block_k(n) = [A_l0 [n, in] | A_l1 [n, in] | ... | Bt_l0 [n, out] | ...]   # [n * row_numel_k]

so a module's ``A`` (or ``Bt``) over the block is a plain contiguous matrix with one row per
rank row (:func:`segment_view`), which a sampled matmul on the CPU reads where it lies. On a
model whose layers agree in shape, every layer's ``A`` of a kind is one contiguous
``[layers, n, in]`` run of the block, and every ``Bt`` another (:func:`group_view`): a copy
of an adapter's rows into the pool is two copies per kind, each from a contiguous host
buffer (on CUDA, pinned, so they stay asynchronous).

An adapter whose modules of kind ``k`` have rank ``r_k`` (the largest over those modules;
layers with a smaller rank or not targeted are zero-padded) is a block of ``r_k`` rows of kind
``k``, and nothing at all for a kind it does not target. :class:`HostAdapter` holds those
blocks kind after kind, in layout order, in ONE contiguous host buffer, so packing allocates
once; the pool (:mod:`vajra.gpu.lora.pool`) keeps one block of all its pages per arena::

    buffer = [block_0(r_0) | block_1(r_1) | ...]    # [sum_k r_k * row_numel_k]

Kinds whose modules have the same shapes layer by layer (on Llama: ``q_proj`` and ``o_proj``;
``k_proj`` and ``v_proj``; ``gate_proj`` and ``up_proj``) have rows of the same layout, so
they share one *arena* of the pool (:attr:`LoraLayout.kind_arenas`).

The LoRA scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) is folded into ``B`` when
packing, so the forward is ``y += (x @ A^T) @ Bt`` with nothing per adapter to look up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from vajra.adapters.format import SERVABLE_MODULES, AdapterManifest, BaseModelSpec, InvalidAdapter

#: The linear layers PEFT targets on Llama-family models.
LLAMA_TARGET_MODULES = SERVABLE_MODULES


class Group(NamedTuple):
    """``repeats`` segments of one ``width``, the first at ``offset`` of the rank row, the
    next ones ``step`` further each."""

    offset: int
    width: int
    repeats: int
    step: int


def _groups(shapes: list[tuple[int, int]]) -> tuple[Group, ...]:
    """A kind's segments (every layer's ``A``, then every layer's ``Bt``; ``shapes`` its
    layers' (in, out)) as groups: two when every layer has the same shape, else one per
    segment."""
    row = sum(i + o for i, o in shapes)
    if len(set(shapes)) == 1:
        in_f, out_f = shapes[0]
        n = len(shapes)
        return Group(0, in_f, n, in_f), Group(n * in_f, out_f, n, out_f)
    widths = [i for i, _ in shapes] + [o for _, o in shapes]
    offsets = [sum(widths[:j]) for j in range(len(widths))]
    return tuple(
        Group(offset, width, 1, row) for offset, width in zip(offsets, widths, strict=True)
    )


def segment_view(block: torch.Tensor, rows: int, offset: int, width: int) -> torch.Tensor:
    """One segment of a block of ``rows`` rank rows (1-D, contiguous): ``[rows, width]``,
    contiguous, row ``j`` of it the segment's piece of rank row ``j``."""
    return block[rows * offset : rows * (offset + width)].view(rows, width)


def group_view(block: torch.Tensor, rows: int, group: Group) -> torch.Tensor:
    """A group's segments of a block of ``rows`` rank rows (1-D, contiguous): a strided
    ``[repeats, rows, width]`` view, ``[i, j]`` segment ``i``'s piece of rank row ``j``."""
    return block.as_strided(
        (group.repeats, rows, group.width),
        (rows * group.step, group.width, 1),
        block.storage_offset() + rows * group.offset,
    )


@dataclass(frozen=True)
class LoraLayout:
    """The targeted modules, their kinds, and where each sits inside its kind's rank row."""

    modules: tuple[str, ...]  # full module paths, in model order
    shapes: tuple[tuple[int, int], ...]  # (in_features, out_features) per module
    kinds: tuple[str, ...]  # module kinds (last path names), in order of first appearance
    module_kinds: tuple[int, ...]  # kind index per module
    a_offsets: tuple[int, ...]  # per module: offset of its A row inside its kind's rank row
    b_offsets: tuple[int, ...]  # per module: offset of its Bt row inside its kind's rank row
    row_numels: tuple[int, ...]  # per kind: elements of one rank row
    kind_arenas: tuple[int, ...]  # per kind: its arena (kinds of equal row layout share one)
    kind_groups: tuple[tuple[Group, ...], ...]  # per kind: its segments as groups (group_view)
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_spec(
        cls, spec: BaseModelSpec, target_modules: Iterable[str] = LLAMA_TARGET_MODULES
    ) -> LoraLayout:
        """Every module of ``spec`` whose last name is in ``target_modules``, in model order."""
        wanted = set(target_modules)
        modules = [m for m in spec.modules if m.rsplit(".", 1)[-1] in wanted]
        if not modules:
            raise ValueError(f"the base model has no module named any of {sorted(wanted)}")
        kinds: list[str] = []
        kind_shapes: list[list[tuple[int, int]]] = []
        module_kinds, places = [], []  # per module: its kind, its place among the kind's
        for m in modules:
            name = m.rsplit(".", 1)[-1]
            if name not in kinds:
                kinds.append(name)
                kind_shapes.append([])
            k = kinds.index(name)
            module_kinds.append(k)
            places.append(len(kind_shapes[k]))
            kind_shapes[k].append(spec.modules[m])
        # A row: every module's A, then every module's Bt, in model order.
        a_offsets = [
            sum(i for i, _ in kind_shapes[k][:j]) for k, j in zip(module_kinds, places, strict=True)
        ]
        b_offsets = [
            sum(i for i, _ in kind_shapes[k]) + sum(o for _, o in kind_shapes[k][:j])
            for k, j in zip(module_kinds, places, strict=True)
        ]
        arena_of: dict[tuple[tuple[int, int], ...], int] = {}
        kind_arenas = [arena_of.setdefault(tuple(s), len(arena_of)) for s in kind_shapes]
        return cls(
            modules=tuple(modules),
            shapes=tuple(spec.modules[m] for m in modules),
            kinds=tuple(kinds),
            module_kinds=tuple(module_kinds),
            a_offsets=tuple(a_offsets),
            b_offsets=tuple(b_offsets),
            row_numels=tuple(sum(i + o for i, o in s) for s in kind_shapes),
            kind_arenas=tuple(kind_arenas),
            kind_groups=tuple(_groups(s) for s in kind_shapes),
            _index={m: i for i, m in enumerate(modules)},
        )

    @property
    def num_arenas(self) -> int:
        return max(self.kind_arenas) + 1

    def index(self, module: str) -> int:
        return self._index[module]

    def __contains__(self, module: object) -> bool:
        return module in self._index

    def ranks_of(self, manifest: AdapterManifest) -> tuple[int, ...]:
        """The adapter's rank rows per kind (0 for a kind it does not target).

        Raises InvalidAdapter for a module the layout does not serve.
        """
        ranks = [0] * len(self.kinds)
        for module in manifest.tensors:
            if module not in self._index:
                raise InvalidAdapter(f"module {module!r} is not among the modules this pool serves")
            k = self.module_kinds[self._index[module]]
            ranks[k] = max(ranks[k], manifest.ranks[module])
        return tuple(ranks)

    def packed_numel(self, ranks: Iterable[int]) -> int:
        """Elements of a packed adapter with ``ranks`` rows per kind."""
        return sum(r * n for r, n in zip(ranks, self.row_numels, strict=True))

    def kind_offsets(self, ranks: Iterable[int]) -> tuple[int, ...]:
        """Where each kind's rows start inside a packed buffer with ``ranks`` rows per kind."""
        offsets, offset = [], 0
        for r, n in zip(ranks, self.row_numels, strict=True):
            offsets.append(offset)
            offset += r * n
        return tuple(offsets)


@dataclass(frozen=True, eq=False)
class HostAdapter:
    """An adapter packed for the pool: one contiguous buffer, pinned when CUDA is available."""

    digest: str
    ranks: tuple[int, ...]  # rank rows per kind of the layout (0: kind not targeted)
    buffer: torch.Tensor  # [sum_k ranks[k] * row_numels[k]], contiguous, in the pool's dtype

    @property
    def rank(self) -> int:
        """The adapter's largest rank over kinds."""
        return max(self.ranks, default=0)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def block(self, layout: LoraLayout, kind: int) -> torch.Tensor:
        """The block of ``kind``'s ``ranks[kind]`` rank rows: a 1-D view of the buffer."""
        start = layout.kind_offsets(self.ranks)[kind]
        return self.buffer[start : start + self.ranks[kind] * layout.row_numels[kind]]


def pack_adapter(
    manifest: AdapterManifest,
    tensors: Mapping[str, torch.Tensor],
    layout: LoraLayout,
    *,
    dtype: torch.dtype = torch.float32,
    pin: bool | None = None,
    out: torch.Tensor | None = None,
) -> HostAdapter:
    """Pack a validated adapter into one buffer laid out for ``layout`` (module docstring).

    ``tensors`` maps the safetensors keys of ``manifest.tensors`` to tensors (e.g.
    ``safetensors.torch.load(weights)``). The scale is folded into B here. ``out`` lets a
    caller pack into memory it owns (a pinned host pool): a contiguous tensor of at least
    ``layout.packed_numel(layout.ranks_of(manifest))`` elements of ``dtype``. Otherwise a new
    buffer is allocated, pinned when ``pin`` (default: when CUDA is available). All
    per-tensor work happens here, once.
    """
    ranks = layout.ranks_of(manifest)
    numel = layout.packed_numel(ranks)
    if out is None:
        pin = torch.cuda.is_available() if pin is None else pin
        buffer = torch.zeros(numel, dtype=dtype, pin_memory=pin)
    else:
        if out.dtype != dtype or not out.is_contiguous() or out.numel() < numel:
            raise ValueError(f"out must be a contiguous {dtype} tensor of >= {numel} elements")
        buffer = out.view(-1)[:numel]
        buffer.zero_()
    packed = HostAdapter(digest=manifest.digest, ranks=ranks, buffer=buffer)
    for module, (key_a, key_b) in manifest.tensors.items():
        i = layout.index(module)
        in_f, out_f = layout.shapes[i]
        r = manifest.ranks[module]
        a, b = tensors[key_a], tensors[key_b]
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise InvalidAdapter(f"module {module!r}: tensors do not match the manifest")
        kind = layout.module_kinds[i]
        block, rows = packed.block(layout, kind), ranks[kind]
        segment_view(block, rows, layout.a_offsets[i], in_f)[:r].copy_(a)
        scaled = b.to(torch.float32).t() * manifest.scale(module)
        segment_view(block, rows, layout.b_offsets[i], out_f)[:r].copy_(scaled)
    return packed


def read_adapter_tensors(weights: bytes) -> dict[str, torch.Tensor]:
    """Decode a safetensors blob (already checked by ``validate_adapter``) into CPU tensors."""
    from safetensors.torch import load

    return load(weights)


def pack_adapter_dir(
    path: Path,
    spec: BaseModelSpec,
    layout: LoraLayout,
    *,
    dtype: torch.dtype = torch.float32,
    max_rank: int = 64,
    max_bytes: int = 1 << 30,
    pin: bool | None = None,
) -> HostAdapter:
    """Validate a PEFT adapter directory against ``spec`` and pack it for ``layout``."""
    from vajra.adapters.format import validate_adapter_dir

    directory = Path(path)
    manifest = validate_adapter_dir(directory, spec, max_rank=max_rank, max_bytes=max_bytes)
    tensors = read_adapter_tensors((directory / "adapter_model.safetensors").read_bytes())
    return pack_adapter(manifest, tensors, layout, dtype=dtype, pin=pin)
