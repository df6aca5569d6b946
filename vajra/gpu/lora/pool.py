"""The GPU adapter pool: LoRA weights of many adapters in memory allocated once.

Layout (the choice, and why)
----------------------------
Adapters arrive packed (:mod:`vajra.gpu.lora.packing`): an adapter of rank ``r`` is ``r``
*rank units* of ``unit_numel`` elements in one contiguous buffer.

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

On CUDA a load runs on a dedicated copy stream and records an event; :meth:`LoraPool.wait_ready`
makes the compute stream wait for it before a batch reads the slot. On the CPU the copy is
synchronous and nothing waits.

:class:`LoraPool` is the torch engine's :class:`~vajra.gpu.interface.AdapterResidency`: the
executor's adapter tiers drive it through that interface only.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vajra.adapters.format import BaseModelSpec, InvalidAdapter
from vajra.errors import OverloadedError
from vajra.gpu.lora.packing import LLAMA_TARGET_MODULES, HostAdapter, LoraLayout

DEFAULT_RANK_CLASSES = (8, 16, 32, 64)


class PoolFull(OverloadedError):
    """No free slot of a large enough rank class; evict an adapter and retry."""


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
