"""The GPU adapter pool: LoRA weights of many adapters in memory allocated once.

Layout (the choice, and why)
----------------------------
A *rank unit* is one row of every targeted module's ``A`` and one row of its ``scale * B^T``,
side by side::

    unit = [A_m0[j, :in_0] | Bt_m0[j, :out_0] | A_m1[j, :in_1] | Bt_m1[j, :out_1] | ...]   # [unit_numel]

An adapter of rank ``r`` (its largest rank over modules; smaller modules are zero-padded) is
``r`` units, packed host-side into ONE contiguous ``[r, unit_numel]`` buffer
(:class:`HostAdapter`), so that moving it into the pool is one copy.

The pool is a few *rank classes* (default 8, 16, 32, 64): class ``c`` is one tensor
``[slots_c, rank_c, unit_numel]`` allocated at start and never resized. An adapter of rank
``r`` takes a slot in the smallest class with ``rank_c >= r`` that has one free (spilling to a
larger class when its own is full); it is copied into the slot's first ``r`` units and the
units above ``r`` that an earlier, larger occupant dirtied are zeroed (a second, small op).
Because every slot of a class has the same size and no slot ever moves, loading and evicting in
any order can never fragment memory, and because classes differ in rank a rank-8 adapter pays
for 8 units, not 64. The price is that the split of ``max_vram_adapters`` between classes is
fixed at start (``slots_per_class``; default an even split); spill keeps the pool usable when
the mix differs. Rows of a slot past the adapter's rank are zero, so computing with the whole
class rank gives exactly the adapter's result.

Each wrapped layer reads its own module's ``A`` and ``Bt`` as strided views of the class tensor
(:meth:`LoraPool.module_views`): ``[slots_c, rank_c, in]`` and ``[slots_c, rank_c, out]``,
row stride ``unit_numel``; no copy.

The LoRA scale (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) is folded into ``B`` when
packing, so the forward is ``y += (x @ A^T) @ Bt`` with nothing per adapter to look up.

On CUDA a load runs on a dedicated copy stream and records an event; :meth:`LoraPool.wait_ready`
makes the compute stream wait for it before a batch reads the slot. On the CPU the copy is
synchronous and nothing waits.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vajra.adapters.format import SERVABLE_MODULES, AdapterManifest, BaseModelSpec, InvalidAdapter
from vajra.errors import OverloadedError

#: The linear layers PEFT targets on Llama-family models.
LLAMA_TARGET_MODULES = SERVABLE_MODULES
DEFAULT_RANK_CLASSES = (8, 16, 32, 64)


class PoolFull(OverloadedError):
    """No free slot of a large enough rank class; evict an adapter and retry."""


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


@dataclass(eq=False)
class _RankClass:
    rank: int
    first_slot: int  # global id of this class's slot 0
    storage: torch.Tensor  # [slots, rank, unit_numel]
    free: list[int]  # heap of free local indices

    @property
    def num_slots(self) -> int:
        return int(self.storage.shape[0])

    @property
    def slot_bytes(self) -> int:
        return int(self.storage[0].numel()) * self.storage.element_size()


@dataclass(eq=False)
class _Resident:
    digest: str
    rank: int
    ready: Any = None  # torch.cuda.Event on CUDA: the copy into the slot finished
    host: HostAdapter | None = None  # kept alive until the async copy is done


class LoraPool:
    """Fixed slots for adapters' A and B on one device; see the module docstring.

    Slot ids are ints ``0 .. num_slots - 1``, classes in ascending rank. Not thread-safe: the
    engine's worker thread owns it.
    """

    def __init__(
        self,
        layout: LoraLayout,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_vram_adapters: int = 100,
        rank_classes: Sequence[int] = DEFAULT_RANK_CLASSES,
        slots_per_class: Sequence[int] | None = None,
    ) -> None:
        ranks = sorted(set(rank_classes))
        if not ranks or ranks[0] <= 0:
            raise ValueError(f"rank_classes must be positive, got {rank_classes!r}")
        if slots_per_class is None:
            if max_vram_adapters < 1:
                raise ValueError("max_vram_adapters must be at least 1")
            base, extra = divmod(max_vram_adapters, len(ranks))
            counts = [base + (1 if i < extra else 0) for i in range(len(ranks))]
        else:
            counts = list(slots_per_class)
            if len(counts) != len(ranks) or any(n < 0 for n in counts) or sum(counts) < 1:
                raise ValueError("slots_per_class needs one count >= 0 per rank class")
        self.layout = layout
        self.device = torch.device(device)
        self.dtype = dtype
        self._classes: list[_RankClass] = []
        first = 0
        for rank, n in zip(ranks, counts, strict=True):
            storage = torch.zeros(n, rank, layout.unit_numel, dtype=dtype, device=self.device)
            self._classes.append(_RankClass(rank, first, storage, list(range(n))))
            first += n
        self.num_slots = first
        self._slot_class = [c for c, cls in enumerate(self._classes) for _ in range(cls.num_slots)]
        self._resident: dict[int, _Resident] = {}
        self._dirty_rank = [0] * first  # units of each slot that may hold non-zero data
        self._views: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        cuda = self.device.type == "cuda"
        self._copy_stream: Any = torch.cuda.Stream(self.device) if cuda else None  # type: ignore[no-untyped-call]
        self._free_events: dict[int, Any] = {}

    @classmethod
    def for_spec(
        cls,
        spec: BaseModelSpec,
        *,
        target_modules: Iterable[str] = LLAMA_TARGET_MODULES,
        **kwargs: Any,
    ) -> LoraPool:
        return cls(LoraLayout.from_spec(spec, target_modules), **kwargs)

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        *,
        target_modules: Iterable[str] = LLAMA_TARGET_MODULES,
        **kwargs: Any,
    ) -> LoraPool:
        """A pool for a loaded model, on its device and in its dtype unless given."""
        param = next(model.parameters())
        kwargs.setdefault("device", param.device)
        kwargs.setdefault("dtype", param.dtype)
        spec = BaseModelSpec(
            model_type=str(getattr(getattr(model, "config", None), "model_type", "unknown")),
            modules={
                name: (int(m.in_features), int(m.out_features))
                for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            },
        )
        return cls.for_spec(spec, target_modules=target_modules, **kwargs)

    # ------------------------------------------------------------------ accounting

    @property
    def rank_classes(self) -> tuple[int, ...]:
        return tuple(c.rank for c in self._classes)

    @property
    def slots_per_class(self) -> tuple[int, ...]:
        return tuple(c.num_slots for c in self._classes)

    @property
    def capacity_bytes(self) -> int:
        """Everything the pool allocated, fixed for its lifetime."""
        return sum(c.slot_bytes * c.num_slots for c in self._classes)

    @property
    def used_bytes(self) -> int:
        """Bytes of the slots that hold an adapter."""
        return sum(self._classes[self._slot_class[s]].slot_bytes for s in self._resident)

    @property
    def num_free(self) -> int:
        return self.num_slots - len(self._resident)

    def is_loaded(self, slot: int) -> bool:
        return slot in self._resident

    def digest_of(self, slot: int) -> str:
        return self._resident[slot].digest

    def rank_of(self, slot: int) -> int:
        """The adapter's own rank (units that matter); the slot may be larger."""
        return self._resident[slot].rank

    def slot_rank(self, slot: int) -> int:
        """The rank of the slot's class."""
        return self._classes[self._slot_class[slot]].rank

    def locate(self, slot: int) -> tuple[int, int]:
        """(class index, index inside the class)."""
        c = self._slot_class[slot]
        return c, slot - self._classes[c].first_slot

    def can_load(self, rank: int) -> bool:
        return any(c.rank >= rank and c.free for c in self._classes)

    def resident(self) -> dict[int, str]:
        return {s: r.digest for s, r in self._resident.items()}

    # ------------------------------------------------------------------ load / free

    def load(self, host: HostAdapter) -> int:
        """Copy ``host`` into a free slot and return the slot id; raise :class:`PoolFull`.

        One copy of the packed buffer, plus one zero-fill if an earlier occupant of the slot
        had a larger rank. On CUDA both run on the copy stream; see :meth:`wait_ready`.
        """
        if host.buffer.shape[-1] != self.layout.unit_numel or host.buffer.dim() != 2:
            raise ValueError("host adapter was packed for a different layout")
        candidates = [c for c in self._classes if c.rank >= host.rank]
        if not candidates:
            raise InvalidAdapter(
                f"adapter rank {host.rank} exceeds the largest pool rank class "
                f"{self._classes[-1].rank}"
            )
        cls = next((c for c in candidates if c.free), None)
        if cls is None:
            raise PoolFull(
                f"adapter pool full: no free slot of rank >= {host.rank} "
                f"({self.num_slots} slots, {self.num_free} free)"
            )
        local = heapq.heappop(cls.free)
        slot = cls.first_slot + local
        target = cls.storage[local]  # [rank_c, unit_numel]
        dirty = self._dirty_rank[slot]
        resident = _Resident(host.digest, host.rank)
        if self._copy_stream is not None:
            stream = self._copy_stream
            freed = self._free_events.pop(slot, None)
            if freed is not None:
                stream.wait_event(freed)  # batches that read the old occupant are done
            with torch.cuda.stream(stream):
                target[: host.rank].copy_(host.buffer, non_blocking=True)
                if dirty > host.rank:
                    target[host.rank : dirty].zero_()
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
            resident.ready, resident.host = event, host
        else:
            target[: host.rank].copy_(host.buffer)
            if dirty > host.rank:
                target[host.rank : dirty].zero_()
        self._dirty_rank[slot] = host.rank
        self._resident[slot] = resident
        return slot

    def free(self, slot: int) -> None:
        """Return ``slot`` to its class; the caller guarantees no new batch will read it."""
        if slot not in self._resident:
            raise KeyError(f"slot {slot} holds no adapter")
        del self._resident[slot]
        c, local = self.locate(slot)
        heapq.heappush(self._classes[c].free, local)
        if self._copy_stream is not None:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(self.device))
            self._free_events[slot] = event

    def copy_event(self, slot: int) -> Any:
        """The CUDA event that completes once the copy into ``slot`` (so every read of the
        host buffer it came from) is done; None on the CPU, where :meth:`load` copies
        synchronously, or once the copy is known to be done. Call it from the thread that
        loaded the slot, right after :meth:`load`."""
        resident = self._resident.get(slot)
        return None if resident is None else resident.ready

    def wait_ready(self, slots: Iterable[int]) -> None:
        """Order the current stream after the copies into ``slots`` (no-op on the CPU)."""
        if self._copy_stream is None:
            return
        stream = torch.cuda.current_stream(self.device)
        for slot in slots:
            resident = self._resident.get(slot)
            if resident is not None and resident.ready is not None:
                stream.wait_event(resident.ready)
                if resident.ready.query():
                    resident.ready, resident.host = None, None

    def synchronize(self) -> None:
        """Block until every pending copy is done (no-op on the CPU)."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()

    # ------------------------------------------------------------------ views for layers

    def module_views(self, module_index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per rank class, this module's ``A`` [slots_c, rank_c, in] and ``Bt`` [slots_c,
        rank_c, out]: strided views into the class storage (no copy)."""
        views = self._views.get(module_index)
        if views is None:
            in_f, out_f = self.layout.shapes[module_index]
            a_off = self.layout.a_offsets[module_index]
            b_off = self.layout.b_offsets[module_index]
            views = [
                (c.storage[:, :, a_off : a_off + in_f], c.storage[:, :, b_off : b_off + out_f])
                for c in self._classes
            ]
            self._views[module_index] = views
        return views

    def read_back(self, slot: int) -> torch.Tensor:
        """A copy of the slot's adapter units [rank, unit_numel] (for tests and debugging)."""
        c, local = self.locate(slot)
        return self._classes[c].storage[local, : self.rank_of(slot)].clone()


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
