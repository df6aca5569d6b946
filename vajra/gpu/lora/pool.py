"""The GPU adapter pool: LoRA weights of many adapters in memory allocated once, in pages.

Layout (the choice, and why)
----------------------------
Adapters arrive packed (:mod:`vajra.gpu.lora.packing`): for each module kind an adapter
targets, ``r_k`` *rank rows* (row ``j`` of ``A`` and of ``Bt`` of every layer's module of that
kind), and nothing for the kinds it does not target.

The pool is one *arena* per row layout, a block of ``pages`` rank rows (segment-major, as
:mod:`vajra.gpu.lora.packing` lays blocks out) allocated at start and never resized, in which
a *page* is one rank row. Kinds whose modules have equal shapes layer
by layer share an arena (on Llama four arenas: q/o, k/v, gate/up, down). An adapter takes
exactly ``r_k`` pages of kind ``k``'s arena for each kind it targets: a rank-8 adapter on
``q_proj`` and ``v_proj`` holds 8 pages for q and 8 for v and nothing else; a rank-64 adapter
on every module 64 pages for each of the seven kinds. Memory thus follows each adapter's own
targets and own rank: nothing is padded to a larger rank, and there are no rank classes whose
split of memory is fixed at start. Any free page of an arena serves any adapter, so loading and
evicting in any order never strands memory (S-LoRA's unified paging, with one page size per
module shape rather than one per hidden size).

Pages need not be contiguous. :mod:`vajra.gpu.lora.pages` hands out the best-fitting single
run when one exists, so usually a kind's rows are one run (one copy per segment group at load,
and plain slices for a prefill segment); otherwise kernels read them through the page table.
Page 0 of every arena is zeros and never handed out: page-table entries past an adapter's rank
point at it, so computing with more rows than an adapter has adds exactly nothing.

Why not rank classes per module kind? They fix at start how memory is split between kinds x
classes (28 on Llama), pad every adapter to its class's rank, and strand memory once a class is
full. Pages cost one indirection instead: the page table, which the kernels follow.

Capacity: ``max_vram_adapters`` slots, and per kind ``max_vram_adapters * mean_rank`` pages
(twice that in an arena of two kinds): room for that many adapters of rank ``mean_rank`` on
every module, and for more when they have lower ranks or fewer modules.

Tables for the kernels, on the pool's device and written at load: :attr:`LoraPool.page_table`
``[kinds, slots + 1, max_rank]`` int32 (page of each rank row; the zero page past the
adapter's rank) and :attr:`LoraPool.rank_table` ``[slots + 1, kinds]`` int32. A batch then only
says which slot each token uses. The extra row, :attr:`LoraPool.null_slot`, never holds an
adapter (rank 0 for every kind): a base-model row of a batch whose slots are device data (a
captured decode graph, :mod:`vajra.gpu.decode_graphs`) names it and gets no delta. Each
wrapped layer reads its module's ``A`` and ``Bt`` as contiguous views of its arena
(:meth:`LoraPool.module_views`, ``[pages, in]`` and ``[pages, out]``): any page's row is read
where it lies, with no copy.

On CUDA a load runs on a dedicated copy stream, after the batches that may still read the
pages freed before it, and records an event. It copies the packed adapter whole into a staging
buffer on the device (one contiguous copy from pinned memory: a strided copy from the host
would first be gathered into pageable memory by the CPU), then into its pages there; :meth:`LoraPool.wait_ready` makes the compute
stream wait for it before a batch reads the slot. On the CPU the copy is synchronous and
nothing waits.

:class:`LoraPool` is the torch engine's :class:`~vajra.gpu.interface.AdapterResidency`: the
executor's adapter tiers drive it through that interface only.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from vajra.adapters.format import BaseModelSpec, InvalidAdapter
from vajra.errors import OverloadedError
from vajra.gpu.lora.packing import (
    LLAMA_TARGET_MODULES,
    HostAdapter,
    LoraLayout,
    group_view,
    segment_view,
)
from vajra.gpu.lora.pages import PageRuns, Run

DEFAULT_MAX_RANK = 64
DEFAULT_MEAN_RANK = 32


class PoolFull(OverloadedError):
    """No free slot, or too few free pages; evict an adapter and retry."""


@dataclass(eq=False)
class _Arena:
    kinds: tuple[int, ...]  # the module kinds whose rows live here
    storage: torch.Tensor  # the block of ``pages`` rank rows, 1-D; page 0 is the zero page
    pages: int  # including the zero page
    free: PageRuns


@dataclass(eq=False)
class _Resident:
    digest: str
    ranks: tuple[int, ...]  # rank rows per kind
    runs: tuple[list[Run], ...]  # per kind: its pages, in row order
    ready: Any = None  # torch.cuda.Event on CUDA: the copy into the slot finished
    host: HostAdapter | None = None  # kept alive until the async copy is done


class LoraPool:
    """Adapters' A and Bt in paged arenas on one device; see the module docstring.

    Not thread-safe: the engine's worker thread owns it.
    """

    def __init__(
        self,
        layout: LoraLayout,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_vram_adapters: int = 100,
        max_rank: int = DEFAULT_MAX_RANK,
        mean_rank: int = DEFAULT_MEAN_RANK,
        staged: bool | None = None,
    ) -> None:
        if max_vram_adapters < 1 or max_rank < 1 or mean_rank < 1:
            raise ValueError("max_vram_adapters, max_rank and mean_rank must be at least 1")
        self.layout = layout
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_slots = max_vram_adapters
        self.max_rank = max_rank
        self.pages_per_kind = max_vram_adapters * mean_rank
        self._arenas: list[_Arena] = []
        for a in range(layout.num_arenas):
            kinds = tuple(k for k, arena in enumerate(layout.kind_arenas) if arena == a)
            pages = self.pages_per_kind * len(kinds)
            row = layout.row_numels[kinds[0]]
            storage = torch.zeros((pages + 1) * row, dtype=dtype, device=self.device)
            self._arenas.append(_Arena(kinds, storage, pages + 1, PageRuns(1, pages)))
        n_kinds = len(layout.kinds)
        self.null_slot = max_vram_adapters  # a table row no adapter ever takes (docstring)
        table_shape = (n_kinds, max_vram_adapters + 1, max_rank)
        self.page_table = torch.zeros(table_shape, dtype=torch.int32, device=self.device)
        self.rank_table = torch.zeros(
            (max_vram_adapters + 1, n_kinds), dtype=torch.int32, device=self.device
        )
        self._free_slots = list(range(max_vram_adapters))  # a heap
        self._resident: dict[int, _Resident] = {}
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._group_views: list[list[torch.Tensor]] = []  # per kind: its groups, whole arena
        for kind, groups in enumerate(layout.kind_groups):
            arena = self._arena(kind)
            self._group_views.append([group_view(arena.storage, arena.pages, g) for g in groups])
        cuda = self.device.type == "cuda"
        self._copy_stream: Any = torch.cuda.Stream(self.device) if cuda else None  # type: ignore[no-untyped-call]
        self._freed: Any = None  # CUDA event: batches that may read freed pages are done
        largest = layout.packed_numel([max_rank] * n_kinds)  # an adapter at max_rank everywhere
        stage = cuda if staged is None else staged  # see _staged
        self._staging = torch.empty(largest, dtype=dtype, device=self.device) if stage else None

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
    def capacity_bytes(self) -> int:
        """Everything the arenas allocated, fixed for the pool's lifetime."""
        return sum(a.storage.numel() * a.storage.element_size() for a in self._arenas)

    @property
    def used_bytes(self) -> int:
        """Bytes of the pages that hold an adapter."""
        element = self._arenas[0].storage.element_size()
        rows = self.layout.row_numels
        return element * sum(
            r * n for res in self._resident.values() for r, n in zip(res.ranks, rows, strict=True)
        )

    @property
    def num_free(self) -> int:
        """Free slot ids (each adapter needs one, and pages)."""
        return len(self._free_slots)

    def free_pages(self) -> tuple[int, ...]:
        """Free pages per arena."""
        return tuple(a.free.free for a in self._arenas)

    def is_loaded(self, slot: int) -> bool:
        return slot in self._resident

    def digest_of(self, slot: int) -> str:
        return self._resident[slot].digest

    def ranks_of(self, slot: int) -> tuple[int, ...]:
        """The adapter's rank rows per kind (0: kind not targeted)."""
        return self._resident[slot].ranks

    def runs(self, slot: int, kind: int) -> list[Run]:
        """The pages holding the slot's rows of ``kind``, as (first page, count) runs."""
        return self._resident[slot].runs[kind]

    def resident(self) -> dict[int, str]:
        return {s: r.digest for s, r in self._resident.items()}

    def _arena(self, kind: int) -> _Arena:
        return self._arenas[self.layout.kind_arenas[kind]]

    def _needs(self, adapter: HostAdapter) -> list[int]:
        """Pages per arena that ``adapter`` takes; raises if it can never fit this pool."""
        layout = self.layout
        if (
            len(adapter.ranks) != len(layout.kinds)
            or adapter.buffer.dim() != 1
            or adapter.buffer.numel() != layout.packed_numel(adapter.ranks)
        ):
            raise ValueError("host adapter was packed for a different layout")
        if adapter.rank > self.max_rank:
            raise InvalidAdapter(
                f"adapter rank {adapter.rank} exceeds the pool's largest rank {self.max_rank}"
            )
        needs = [0] * len(self._arenas)
        for kind, r in enumerate(adapter.ranks):
            needs[layout.kind_arenas[kind]] += r
        for arena, n in zip(self._arenas, needs, strict=True):
            if n > arena.pages - 1:
                raise InvalidAdapter(f"adapter needs {n} pages of an arena of fewer")
        return needs

    def can_load(self, adapter: HostAdapter) -> bool:
        """Whether :meth:`load` would find a slot and pages for ``adapter`` now. Raises
        InvalidAdapter when it could never fit this pool (ValueError: wrong layout)."""
        needs = self._needs(adapter)
        if not self._free_slots:
            return False
        return all(n <= a.free.free for a, n in zip(self._arenas, needs, strict=True))

    def frees_room_for(self, slot: int, adapter: HostAdapter) -> bool:
        """Whether freeing ``slot`` gives back something ``adapter`` lacks: a slot id when
        none is free, or pages of an arena that has too few."""
        resident = self._resident.get(slot)
        if resident is None:
            return False
        if not self._free_slots:
            return True
        needs = self._needs(adapter)
        return any(
            n > arena.free.free and any(resident.ranks[k] for k in arena.kinds)
            for arena, n in zip(self._arenas, needs, strict=True)
        )

    # ------------------------------------------------------------------ load / free

    def load(self, host: HostAdapter) -> int:
        """Copy ``host`` into free pages under a free slot id and return the slot; raise
        :class:`PoolFull` when there is no room now, InvalidAdapter when there never is. On
        CUDA: one copy in, then device copies into the pages; see :meth:`wait_ready`."""
        needs = self._needs(host)
        if not self._free_slots:
            raise PoolFull(f"adapter pool full: all {self.num_slots} slots hold adapters")
        for arena, n in zip(self._arenas, needs, strict=True):
            if n > arena.free.free:
                names = "/".join(self.layout.kinds[k] for k in arena.kinds)
                raise PoolFull(
                    f"adapter pool full: {n} pages of {names} needed, {arena.free.free} free"
                )
        slot = heapq.heappop(self._free_slots)
        runs = tuple(self._arena(k).free.take(r) for k, r in enumerate(host.ranks))
        resident = _Resident(host.digest, host.ranks, runs)
        if self._copy_stream is not None:
            stream = self._copy_stream
            if self._freed is not None:
                stream.wait_event(self._freed)  # batches that read freed pages are done
                self._freed = None
            with torch.cuda.stream(stream):
                self._write(slot, self._staged(host, non_blocking=True), runs, non_blocking=True)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
            resident.ready, resident.host = event, host
        else:
            self._write(slot, self._staged(host, non_blocking=False), runs, non_blocking=False)
        self._resident[slot] = resident
        return slot

    def _staged(self, host: HostAdapter, *, non_blocking: bool) -> HostAdapter:
        """``host`` with its buffer copied whole (one contiguous copy) into the staging buffer,
        whence the strided copies into pages run on the device; ``host`` when there is none.
        Loads run in one stream's order, so the next cannot overwrite it early."""
        n = host.buffer.numel()
        if self._staging is None or n > self._staging.numel():
            return host
        staging = self._staging[:n]
        staging.copy_(host.buffer, non_blocking=non_blocking)
        return dataclasses.replace(host, buffer=staging)

    def _write(
        self, slot: int, host: HostAdapter, runs: tuple[list[Run], ...], *, non_blocking: bool
    ) -> None:
        """Copy the rows into their pages; point the slot's tables at them. Device-side only:
        the tables are filled by kernels with scalar arguments, not copied from the host."""
        self.page_table[:, slot].zero_()
        for kind, r in enumerate(host.ranks):
            self.rank_table[slot, kind].fill_(r)
            if not r:
                continue
            block = host.block(self.layout, kind)
            sources = [group_view(block, r, g) for g in self.layout.kind_groups[kind]]
            row = 0
            for first, n in runs[kind]:
                for to, source in zip(self._group_views[kind], sources, strict=True):
                    to[:, first : first + n].copy_(source[:, row : row + n], non_blocking)
                pages = torch.arange(first, first + n, dtype=torch.int32, device=self.device)
                self.page_table[kind, slot, row : row + n].copy_(pages)
                row += n

    def free(self, slot: int) -> None:
        """Give ``slot`` and its pages back; the caller guarantees no new batch will read it."""
        resident = self._resident.pop(slot, None)
        if resident is None:
            raise KeyError(f"slot {slot} holds no adapter")
        for kind, r in enumerate(resident.ranks):
            if r:
                self._arena(kind).free.give(resident.runs[kind])
        heapq.heappush(self._free_slots, slot)
        if self._copy_stream is not None:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(self.device))
            self._freed = event  # later than any earlier one on the same stream

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

    def module_views(self, module_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This module's ``A`` [pages, in] and ``Bt`` [pages, out]: contiguous views into its
        arena (no copy); row ``p`` is page ``p``."""
        views = self._views.get(module_index)
        if views is None:
            layout = self.layout
            in_f, out_f = layout.shapes[module_index]
            a_off, b_off = layout.a_offsets[module_index], layout.b_offsets[module_index]
            arena = self._arena(layout.module_kinds[module_index])
            views = (
                segment_view(arena.storage, arena.pages, a_off, in_f),
                segment_view(arena.storage, arena.pages, b_off, out_f),
            )
            self._views[module_index] = views
        return views

    def read_back(self, slot: int) -> torch.Tensor:
        """A copy of the slot's rows in packed form (as :class:`HostAdapter.buffer`), on the
        pool's device (for tests and debugging)."""
        resident = self._resident[slot]
        parts = []
        for kind, r in enumerate(resident.ranks):
            if not r:
                continue
            numel = r * self.layout.row_numels[kind]
            block = torch.empty(numel, dtype=self.dtype, device=self.device)
            targets = [group_view(block, r, g) for g in self.layout.kind_groups[kind]]
            row = 0
            for first, n in resident.runs[kind]:
                for whole, to in zip(self._group_views[kind], targets, strict=True):
                    to[:, row : row + n].copy_(whole[:, first : first + n])
                row += n
            parts.append(block)
        if not parts:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        return torch.cat(parts)

    def arena_pages(self, kind: int) -> int:
        """Pages (rows of :meth:`module_views`) of ``kind``'s arena, the zero page included."""
        return self._arena(kind).pages
