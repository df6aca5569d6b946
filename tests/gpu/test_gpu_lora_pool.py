"""The adapter pool's slot table and memory, and the batched LoRA math, on small CPU tensors.

Rules: pure invariants are checked with Hypothesis over random load/free orders and random
row-to-adapter assignments; every expected value is recomputed with a plain per-row loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vajra.adapters import AdapterManifest, BaseModelSpec, InvalidAdapter
from vajra.gpu.lora import (
    HostAdapter,
    LoraBatchState,
    LoraLayout,
    LoraPool,
    PoolFull,
    lora_gather,
    lora_segment,
    pack_adapter,
)

SPEC = BaseModelSpec(
    model_type="llama",
    modules={
        "model.layers.0.self_attn.q_proj": (8, 8),
        "model.layers.0.self_attn.k_proj": (8, 4),
        "model.layers.0.mlp.down_proj": (12, 8),
        "model.layers.0.mlp.other": (8, 8),  # not targeted
        "lm_head": (8, 30),
    },
)
LAYOUT = LoraLayout.from_spec(SPEC, ("q_proj", "k_proj", "down_proj"))


def host(rank: int, fill: float) -> HostAdapter:
    buffer = torch.full((rank, LAYOUT.unit_numel), fill)
    return HostAdapter(digest=f"d{fill}", rank=rank, buffer=buffer)


def make_pool(counts: tuple[int, ...] = (3, 2, 2, 1)) -> LoraPool:
    return LoraPool(LAYOUT, rank_classes=(8, 16, 32, 64), slots_per_class=counts)


def test_layout_and_capacity() -> None:
    assert LAYOUT.modules == (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.down_proj",
    )
    assert LAYOUT.unit_numel == (8 + 8) + (8 + 4) + (12 + 8)
    pool = make_pool()
    assert pool.num_slots == 8 and pool.num_free == 8
    assert pool.capacity_bytes == 4 * LAYOUT.unit_numel * (3 * 8 + 2 * 16 + 2 * 32 + 64)
    # every adapter paying for rank 64 would need more than twice the memory
    assert pool.capacity_bytes * 2 < 4 * LAYOUT.unit_numel * 64 * 8
    assert pool.used_bytes == 0


def test_default_split_of_max_vram_adapters() -> None:
    pool = LoraPool(LAYOUT, max_vram_adapters=100)
    assert pool.slots_per_class == (25, 25, 25, 25)
    assert pool.rank_classes == (8, 16, 32, 64)
    odd = LoraPool(LAYOUT, max_vram_adapters=7, rank_classes=(16, 4))
    assert odd.rank_classes == (4, 16) and odd.slots_per_class == (4, 3)


def test_full_pool_spills_then_refuses_and_freed_slots_are_reused() -> None:
    pool = make_pool((1, 1, 0, 1))
    a = pool.load(host(4, 1.0))
    assert pool.slot_rank(a) == 8
    b = pool.load(host(8, 2.0))  # class 8 is full: spills into 16
    assert pool.slot_rank(b) == 16
    c = pool.load(host(3, 3.0))  # then into 64
    assert pool.slot_rank(c) == 64
    with pytest.raises(PoolFull, match="full"):
        pool.load(host(2, 4.0))
    assert PoolFull("x").retriable
    with pytest.raises(InvalidAdapter, match="rank 65"):
        pool.load(host(65, 5.0))
    pool.free(a)
    assert not pool.is_loaded(a)
    again = pool.load(host(8, 6.0))
    assert again == a
    assert torch.equal(pool.read_back(again), torch.full((8, LAYOUT.unit_numel), 6.0))
    with pytest.raises(KeyError):
        pool.free(99)


def test_smaller_adapter_in_a_dirty_slot_sees_zeros_above_its_rank() -> None:
    pool = make_pool((1, 0, 0, 0))
    slot = pool.load(host(8, 7.0))
    pool.free(slot)
    assert pool.load(host(3, 1.0)) == slot
    a, bt = pool.module_views(0)[0]
    assert torch.all(a[0, :3] == 1.0) and torch.all(a[0, 3:] == 0.0)
    assert torch.all(bt[0, 3:] == 0.0)


def test_copy_event_is_none_on_the_cpu_where_load_copies_synchronously() -> None:
    pool = make_pool((1, 0, 0, 0))
    buffer = host(4, 2.0)
    slot = pool.load(buffer)
    assert pool.copy_event(slot) is None
    buffer.buffer.fill_(9.0)  # the host buffer is free to reuse at once
    assert torch.equal(pool.read_back(slot), torch.full((4, LAYOUT.unit_numel), 2.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_copy_event_completes_once_the_host_buffer_was_read() -> None:
    pool = LoraPool(LAYOUT, device="cuda", rank_classes=(8,), slots_per_class=(2,))
    buffer = torch.full((8, LAYOUT.unit_numel), 3.0).pin_memory()
    slot = pool.load(HostAdapter(digest="d3", rank=8, buffer=buffer))
    event = pool.copy_event(slot)
    assert event is not None
    event.synchronize()
    assert event.query()
    buffer.fill_(9.0)  # reusing the host buffer now cannot change the slot
    pool.wait_ready([slot])
    assert torch.equal(pool.read_back(slot).cpu(), torch.full((8, LAYOUT.unit_numel), 3.0))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("load"), st.integers(1, 64)),
            st.tuples(st.just("free"), st.integers(0, 100)),
        ),
        max_size=60,
    )
)
def test_random_fill_evict_refill_keeps_slots_consistent(ops: list[tuple[str, int]]) -> None:
    pool = make_pool()
    storages = [c.storage.data_ptr() for c in pool._classes]
    capacity = pool.capacity_bytes
    expected: dict[int, tuple[int, float]] = {}  # slot -> (rank, fill)
    for n, (op, arg) in enumerate(ops):
        if op == "free":
            if not expected:
                continue
            slot = sorted(expected)[arg % len(expected)]
            pool.free(slot)
            del expected[slot]
            continue
        fits = [
            r
            for r, count, first in zip(
                pool.rank_classes,
                pool.slots_per_class,
                [0, 3, 5, 7],
                strict=True,
            )
            if r >= arg and any(s not in expected for s in range(first, first + count))
        ]
        if not fits:
            with pytest.raises(PoolFull):
                pool.load(host(arg, float(n)))
            continue
        slot = pool.load(host(arg, float(n)))
        assert slot not in expected
        assert pool.slot_rank(slot) == fits[0]  # the smallest class with room
        expected[slot] = (arg, float(n))
    assert pool.capacity_bytes == capacity
    assert [c.storage.data_ptr() for c in pool._classes] == storages  # nothing reallocated
    assert pool.num_free == pool.num_slots - len(expected)
    assert pool.used_bytes == sum(4 * LAYOUT.unit_numel * pool.slot_rank(s) for s in expected)
    for slot, (rank, fill) in expected.items():
        assert pool.rank_of(slot) == rank
        assert torch.equal(pool.read_back(slot), torch.full((rank, LAYOUT.unit_numel), fill))
        c, local = pool.locate(slot)
        assert torch.all(pool._classes[c].storage[local, rank:] == 0)
    # everything freed: the pool can be filled again to capacity
    for slot in list(expected):
        pool.free(slot)
    loaded = [pool.load(host(r, 1.0)) for r in (8, 8, 8, 16, 16, 32, 32, 64)]
    assert sorted(loaded) == list(range(pool.num_slots))


def manifest(ranks: dict[str, int], alphas: dict[str, float], rslora: bool) -> AdapterManifest:
    return AdapterManifest(
        rank=max(ranks.values()),
        ranks=ranks,
        lora_alpha=1.0,
        alphas=alphas,
        target_modules=(),
        modules=tuple(ranks),
        use_rslora=rslora,
        dtype="F32",
        size_bytes=0,
        digest="x",
        tensors={m: (f"{m}.A", f"{m}.B") for m in ranks},
    )


def test_pack_places_a_rows_and_scaled_b_columns() -> None:
    q, down = LAYOUT.modules[0], LAYOUT.modules[2]
    ranks = {q: 4, down: 2}
    tensors = {
        f"{q}.A": torch.randn(4, 8),
        f"{q}.B": torch.randn(8, 4),
        f"{down}.A": torch.randn(2, 12),
        f"{down}.B": torch.randn(8, 2),
    }
    packed = pack_adapter(manifest(ranks, {q: 8.0, down: 3.0}, True), tensors, LAYOUT, pin=False)
    assert packed.rank == 4 and packed.buffer.shape == (4, LAYOUT.unit_numel)
    assert packed.nbytes == 4 * 4 * LAYOUT.unit_numel
    units = packed.buffer
    assert torch.equal(units[:, 0:8], tensors[f"{q}.A"])
    torch.testing.assert_close(units[:, 8:16], tensors[f"{q}.B"].t() * (8 / math.sqrt(4)))
    assert torch.all(units[:, 16:28] == 0)  # k_proj untargeted
    down_a = LAYOUT.a_offsets[2]
    assert torch.equal(units[:2, down_a : down_a + 12], tensors[f"{down}.A"])
    assert torch.all(units[2:, down_a:] == 0)
    torch.testing.assert_close(
        units[:2, down_a + 12 :], tensors[f"{down}.B"].t() * (3 / math.sqrt(2))
    )
    out = torch.full((200, LAYOUT.unit_numel), 9.0)
    into = pack_adapter(manifest(ranks, {q: 8.0, down: 3.0}, True), tensors, LAYOUT, out=out)
    assert into.buffer.data_ptr() == out.data_ptr()
    assert torch.equal(into.buffer, units)
    with pytest.raises(InvalidAdapter, match="not among"):
        pack_adapter(
            manifest({"lm_head": 2}, {"lm_head": 1.0}, False),
            {"lm_head.A": torch.zeros(2, 8), "lm_head.B": torch.zeros(30, 2)},
            LAYOUT,
        )


def reference_delta(
    x: torch.Tensor, slots: list[int | None], a: torch.Tensor, bt: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros(x.shape[0], x.shape[1], bt.shape[-1], dtype=torch.float64)
    for row, slot in enumerate(slots):
        if slot is not None:
            out[row] = (x[row].double() @ a[slot].double().t()) @ bt[slot].double()
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.integers(0, 5)), min_size=1, max_size=12),
    st.integers(1, 4),
)
def test_gather_and_segment_kernels_match_a_per_row_loop(
    slots: list[int | None], tokens: int
) -> None:
    torch.manual_seed(len(slots) * 10 + tokens)
    a, bt = torch.randn(6, 5, 7), torch.randn(6, 5, 3)
    x = torch.randn(len(slots), tokens, 7)
    want = reference_delta(x, slots, a, bt)
    rows = [i for i, s in enumerate(slots) if s is not None]
    gathered = torch.zeros(len(slots), tokens, 3)
    if rows:
        lora_gather(
            x,
            gathered,
            torch.tensor(rows),
            torch.tensor([slots[i] for i in rows]),
            a,
            bt,
        )
    segmented = torch.zeros(len(slots), tokens, 3)
    for slot in {s for s in slots if s is not None}:
        group = [i for i, s in enumerate(slots) if s == slot]
        lora_segment(x, segmented, torch.tensor(group), 0, 0, a[slot], bt[slot])
    torch.testing.assert_close(gathered.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(segmented.double(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.integers(0, 7)), min_size=1, max_size=20),
    st.sampled_from(["gather", "segmented", "auto"]),
)
def test_batch_state_adds_each_rows_adapter(rows: list[int | None], mode: str) -> None:
    pool = make_pool((3, 2, 2, 1))
    torch.manual_seed(0)
    ranks = [1, 8, 3, 9, 16, 20, 32, 64]
    slots = [pool.load(HostAdapter("d", r, torch.randn(r, LAYOUT.unit_numel))) for r in ranks]
    slot_of = [None if r is None else slots[r] for r in rows]
    state = LoraBatchState(pool, max_rows=4, mode=mode)  # type: ignore[arg-type]
    x = torch.randn(len(rows), 2, 12)  # down_proj: in 12, out 8
    module = 2
    with state.rows(slot_of):
        got = state.apply(module, x, torch.zeros(len(rows), 2, 8))
    want = torch.zeros(len(rows), 2, 8, dtype=torch.float64)
    a_off, b_off = LAYOUT.a_offsets[module], LAYOUT.b_offsets[module]
    for row, slot in enumerate(slot_of):
        if slot is not None:
            units = pool.read_back(slot).double()
            want[row] = (x[row].double() @ units[:, a_off : a_off + 12].t()) @ units[
                :, b_off : b_off + 8
            ]
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert not state.active  # cleared on leaving the block
    untouched = torch.ones(len(rows), 2, 8)
    assert torch.equal(state.apply(module, x, untouched.clone()), untouched)


def test_batch_state_refuses_an_empty_slot() -> None:
    pool = make_pool()
    state = LoraBatchState(pool)
    with pytest.raises(KeyError, match="slot 3"):
        state.set_rows([None, 3])
