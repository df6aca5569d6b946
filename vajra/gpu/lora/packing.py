"""The packed form of a LoRA adapter: one contiguous host buffer, ready for one copy.

A *rank unit* is one row of every targeted module's ``A`` and one row of its ``scale * B^T``,
side by side::

    unit = [A_m0[j, :in_0] | Bt_m0[j, :out_0] | A_m1[j, :in_1] | Bt_m1[j, :out_1] | ...]   # [unit_numel]

:class:`LoraLayout` says where each module's rows sit inside a unit. An adapter of rank ``r``
(its largest rank over modules; smaller modules are zero-padded) is ``r`` units, packed
host-side into ONE contiguous ``[r, unit_numel]`` buffer (:class:`HostAdapter`), so that
moving it into the pool (:mod:`vajra.gpu.lora.pool`) is one copy.

The LoRA scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) is folded into ``B`` when
packing, so the forward is ``y += (x @ A^T) @ Bt`` with nothing per adapter to look up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vajra.adapters.format import SERVABLE_MODULES, AdapterManifest, BaseModelSpec, InvalidAdapter

#: The linear layers PEFT targets on Llama-family models.
LLAMA_TARGET_MODULES = SERVABLE_MODULES


@dataclass(frozen=True)
class LoraLayout:
    """Where each targeted module's A row and Bt row sit inside one rank unit."""

    modules: tuple[str, ...]  # full module paths, in unit order
    shapes: tuple[tuple[int, int], ...]  # (in_features, out_features) per module
    a_offsets: tuple[int, ...]  # element offset of A's row inside a unit
    b_offsets: tuple[int, ...]  # element offset of Bt's row inside a unit
    unit_numel: int
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
        shapes, a_offsets, b_offsets = [], [], []
        offset = 0
        for m in modules:
            in_f, out_f = spec.modules[m]
            shapes.append((in_f, out_f))
            a_offsets.append(offset)
            b_offsets.append(offset + in_f)
            offset += in_f + out_f
        return cls(
            tuple(modules),
            tuple(shapes),
            tuple(a_offsets),
            tuple(b_offsets),
            offset,
            {m: i for i, m in enumerate(modules)},
        )

    def index(self, module: str) -> int:
        return self._index[module]

    def __contains__(self, module: object) -> bool:
        return module in self._index


@dataclass(frozen=True, eq=False)
class HostAdapter:
    """An adapter packed for the pool: one contiguous buffer, pinned when CUDA is available."""

    digest: str
    rank: int  # units held: the adapter's largest rank
    buffer: torch.Tensor  # [rank, unit_numel], contiguous, in the pool's dtype

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def pack_adapter(
    manifest: AdapterManifest,
    tensors: Mapping[str, torch.Tensor],
    layout: LoraLayout,
    *,
    dtype: torch.dtype = torch.float32,
    pin: bool | None = None,
    out: torch.Tensor | None = None,
) -> HostAdapter:
    """Pack a validated adapter into one ``[rank, unit_numel]`` buffer laid out for ``layout``.

    ``tensors`` maps the safetensors keys of ``manifest.tensors`` to tensors (e.g.
    ``safetensors.torch.load(weights)``). The scale is folded into B here. ``out`` lets a
    caller pack into memory it owns (a pinned host pool): a contiguous tensor of at least
    ``rank * unit_numel`` elements of ``dtype``. Otherwise a new buffer is allocated, pinned
    when ``pin`` (default: when CUDA is available). All per-tensor work happens here, once.
    """
    rank = manifest.rank
    numel = rank * layout.unit_numel
    if out is None:
        pin = torch.cuda.is_available() if pin is None else pin
        buffer = torch.zeros(numel, dtype=dtype, pin_memory=pin)
    else:
        if out.dtype != dtype or not out.is_contiguous() or out.numel() < numel:
            raise ValueError(f"out must be a contiguous {dtype} tensor of >= {numel} elements")
        buffer = out.view(-1)[:numel]
        buffer.zero_()
    units = buffer.view(rank, layout.unit_numel)
    for module, (key_a, key_b) in manifest.tensors.items():
        if module not in layout:
            raise InvalidAdapter(f"module {module!r} is not among the modules this pool serves")
        i = layout.index(module)
        in_f, out_f = layout.shapes[i]
        r = manifest.ranks[module]
        a, b = tensors[key_a], tensors[key_b]
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise InvalidAdapter(f"module {module!r}: tensors do not match the manifest")
        a_off, b_off = layout.a_offsets[i], layout.b_offsets[i]
        units[:r, a_off : a_off + in_f].copy_(a)
        scaled = b.to(torch.float32).t() * manifest.scale(module)
        units[:r, b_off : b_off + out_f].copy_(scaled)
    return HostAdapter(digest=manifest.digest, rank=rank, buffer=units)


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
