"""The adapter pool's pages, slot table and memory, and the packed form, on small CPU tensors.

Rules: pure invariants are checked with Hypothesis over random load/free orders; every
expected value is recomputed from the adapter's own rows, never read back from where the code
under test put it.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.gpu.lora_kit import HIDDEN, INTER, KV, LAYOUT, SPEC, make_adapter, manifest
from vajra.adapters import BaseModelSpec, InvalidAdapter
from vajra.gpu.lora import HostAdapter, LoraLayout, LoraPool, PoolFull, pack_adapter
from vajra.gpu.lora.pages import PageRuns, expand

KINDS = {name: k for k, name in enumerate(LAYOUT.kinds)}
ROW = {name: LAYOUT.row_numels[k] for name, k in KINDS.items()}


def host(ranks: dict[str, int], fill: float) -> HostAdapter:
    per_kind = tuple(ranks.get(kind, 0) for kind in LAYOUT.kinds)
    return HostAdapter(f"d{fill}", per_kind, torch.full((LAYOUT.packed_numel(per_kind),), fill))


def test_layout_rows_per_kind_and_shared_arenas() -> None:
    assert LAYOUT.kinds == ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
    assert len(LAYOUT.modules) == 10  # five kinds on two layers; "other" and lm_head untargeted
    assert ROW == {
        "q_proj": 2 * (HIDDEN + HIDDEN),
        "k_proj": 2 * (HIDDEN + KV),
        "v_proj": 2 * (HIDDEN + KV),
        "o_proj": 2 * (HIDDEN + HIDDEN),
        "down_proj": 2 * (INTER + HIDDEN),
    }
    # q and o, k and v have the same shapes layer by layer: they share an arena
    assert LAYOUT.kind_arenas == (0, 1, 1, 0, 2) and LAYOUT.num_arenas == 3
    q1 = LAYOUT.index("model.layers.1.self_attn.q_proj")
    # a row: every layer's A, then every layer's Bt
    assert (LAYOUT.a_offsets[q1], LAYOUT.b_offsets[q1]) == (HIDDEN, 3 * HIDDEN)
    # both layers agree: each kind's segments are two groups, every A and every Bt
    k = KINDS["k_proj"]
    assert LAYOUT.kind_groups[k] == ((0, HIDDEN, 2, HIDDEN), (2 * HIDDEN, KV, 2, KV))


def test_memory_follows_the_targeted_modules_and_the_adapters_own_rank() -> None:
    pool = LoraPool(LAYOUT, max_vram_adapters=4, max_rank=64, mean_rank=32)
    element = 4
    assert pool.capacity_bytes == element * sum(
        (4 * 32 * n + 1) * ROW[kinds[0]]
        for kinds, n in ((("q_proj", "o_proj"), 2), (("k_proj", "v_proj"), 2), (("down_proj",), 1))
    )
    qv = pool.load(host({"q_proj": 16, "v_proj": 16}, 1.0))
    qv_bytes = pool.used_bytes
    assert qv_bytes == element * 16 * (ROW["q_proj"] + ROW["v_proj"])
    everything = pool.load(host(dict.fromkeys(LAYOUT.kinds, 16), 2.0))
    all_bytes = pool.used_bytes - qv_bytes
    assert all_bytes == element * 16 * sum(ROW.values())
    assert qv_bytes < all_bytes / 2
    pool.free(everything)
    small = pool.load(host(dict.fromkeys(LAYOUT.kinds, 8), 3.0))
    # a rank-8 adapter takes 8 rows per kind, whatever ranks came before it
    assert pool.used_bytes - qv_bytes == element * 8 * sum(ROW.values())
    assert pool.free_pages() == (2 * 128 - 16 - 2 * 8, 2 * 128 - 16 - 2 * 8, 128 - 8)
    assert pool.ranks_of(small) == (8, 8, 8, 8, 8) and pool.ranks_of(qv) == (16, 0, 16, 0, 0)


def test_no_room_is_retriable_no_fit_is_invalid_and_freed_memory_is_reused() -> None:
    pool = LoraPool(LAYOUT, max_vram_adapters=3, max_rank=64, mean_rank=20)  # 60 pages per kind
    a = pool.load(host({"down_proj": 40}, 1.0))
    with pytest.raises(PoolFull, match="down_proj") as full:
        pool.load(host({"down_proj": 21}, 2.0))  # pages: 20 of down_proj left
    assert full.value.retriable
    b = pool.load(host({"q_proj": 64, "o_proj": 56}, 3.0))  # the shared q/o arena: 120 pages
    assert not pool.can_load(host({"o_proj": 1}, 4.0))
    c = pool.load(host({"k_proj": 1}, 5.0))
    with pytest.raises(PoolFull, match="slots"):
        pool.load(host({"k_proj": 1}, 6.0))  # every slot id taken
    with pytest.raises(InvalidAdapter, match="rank 65"):
        pool.can_load(host({"k_proj": 65}, 7.0))
    with pytest.raises(ValueError, match="different layout"):
        pool.load(HostAdapter("x", (1, 0, 0, 0, 0), torch.zeros(3)))
    assert pool.frees_room_for(a, host({"k_proj": 1}, 8.0))  # any slot id helps
    pool.free(c)
    want = host({"down_proj": 30}, 9.0)
    assert not pool.can_load(want)
    assert pool.frees_room_for(a, want) and not pool.frees_room_for(b, want)
    pool.free(a)
    again = pool.load(want)
    assert torch.equal(pool.read_back(again), want.buffer)
    with pytest.raises(KeyError):
        pool.free(99)


# staged: each load copies the packed buffer whole into the pool's staging buffer first and
# scatters from there (CUDA's default); the pages must end up the same either way.
@pytest.mark.parametrize("staged", [False, True])
def test_pages_of_one_adapter_may_be_scattered_and_the_tables_follow_them(staged: bool) -> None:
    pool = LoraPool(LAYOUT, max_vram_adapters=4, max_rank=64, mean_rank=10, staged=staged)
    first = pool.load(host({"down_proj": 16}, 1.0))
    pool.load(host({"down_proj": 8}, 2.0))
    third = pool.load(host({"down_proj": 16}, 3.0))
    pool.free(first)
    pool.free(third)
    adapter = make_adapter({"down_proj": 24}, seed=5)
    slot = pool.load(adapter.host)
    down = KINDS["down_proj"]
    assert pool.runs(slot, down) == [(1, 16), (25, 8)]
    pages = pool.page_table[down, slot].tolist()
    assert pages == [*range(1, 17), *range(25, 33), *[0] * 40]  # the zero page past rank 24
    assert pool.rank_table[slot].tolist() == [0, 0, 0, 0, 24]
    assert torch.equal(pool.read_back(slot), adapter.host.buffer)
    module = "model.layers.1.mlp.down_proj"
    a, bt = pool.module_views(LAYOUT.index(module))
    assert torch.equal(a[0], torch.zeros(INTER)) and torch.equal(bt[0], torch.zeros(HIDDEN))
    # each module's view is contiguous, and its rows at the slot's pages are the adapter's own
    assert a.is_contiguous() and bt.is_contiguous()
    rows = pool.page_table[down, slot, :24].long()
    assert torch.equal(a[rows], adapter.a[module])
    torch.testing.assert_close(bt[rows], adapter.bt[module])


@pytest.mark.parametrize("staged", [False, True])
def test_layers_of_different_shapes_are_copied_segment_by_segment(staged: bool) -> None:
    """A kind whose layers disagree in shape: one group per segment, and every module's view
    still holds the adapter's own rows at the slot's pages, scattered or not."""
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    layout = LoraLayout.from_spec(
        BaseModelSpec(model_type="llama", modules={q0: (6, 5), q1: (4, 7)}), ("q_proj",)
    )
    assert layout.kind_groups == (((0, 6, 1, 22), (6, 4, 1, 22), (10, 5, 1, 22), (15, 7, 1, 22)),)
    gen = torch.Generator().manual_seed(3)
    a = {q0: torch.randn(3, 6, generator=gen), q1: torch.randn(2, 4, generator=gen)}
    b = {q0: torch.randn(5, 3, generator=gen), q1: torch.randn(7, 2, generator=gen)}
    tensors = {f"{m}.A": a[m] for m in a} | {f"{m}.B": b[m] for m in b}
    packed = pack_adapter(manifest({q0: 3, q1: 2}, {q0: 3.0, q1: 4.0}), tensors, layout, pin=False)
    pool = LoraPool(layout, max_vram_adapters=4, max_rank=8, mean_rank=3, staged=staged)
    x, _, z, w = (pool.load(host_for(layout, r, float(r))) for r in (2, 2, 2, 6))
    pool.free(x)
    pool.free(z)
    scattered = pool.load(packed)  # 3 pages from the free runs 1-2 and 5-6
    assert len(pool.runs(scattered, 0)) == 2
    pool.free(w)
    whole = pool.load(packed)
    assert len(pool.runs(whole, 0)) == 1
    for s in (scattered, whole):
        assert torch.equal(pool.read_back(s), packed.buffer)
        rows = pool.page_table[0, s, :3].long()
        for m, scale in ((q0, 1.0), (q1, 2.0)):
            view_a, view_bt = pool.module_views(layout.index(m))
            r = a[m].shape[0]
            assert torch.equal(view_a[rows[:r]], a[m])
            torch.testing.assert_close(view_bt[rows[:r]], b[m].t() * scale)
            assert torch.all(view_a[rows[r:]] == 0) and torch.all(view_bt[rows[r:]] == 0)


def host_for(layout: LoraLayout, rank: int, fill: float) -> HostAdapter:
    return HostAdapter(f"h{fill}", (rank,), torch.full((layout.packed_numel((rank,)),), fill))


def test_copy_event_is_none_on_the_cpu_where_load_copies_synchronously() -> None:
    pool = LoraPool(LAYOUT, max_vram_adapters=1, mean_rank=8)
    buffer = host({"q_proj": 4}, 2.0)
    slot = pool.load(buffer)
    assert pool.copy_event(slot) is None
    want = buffer.buffer.clone()
    buffer.buffer.fill_(9.0)  # the host buffer is free to reuse at once
    assert torch.equal(pool.read_back(slot), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_copy_event_completes_once_the_host_buffer_was_read() -> None:
    pool = LoraPool(LAYOUT, device="cuda", max_vram_adapters=2, mean_rank=8)
    adapter = host({"q_proj": 8, "down_proj": 4}, 3.0)
    buffer = adapter.buffer.pin_memory()
    slot = pool.load(HostAdapter("d3", adapter.ranks, buffer))
    event = pool.copy_event(slot)
    assert event is not None
    event.synchronize()
    assert event.query()
    buffer.fill_(9.0)  # reusing the host buffer now cannot change the slot
    pool.wait_ready([slot])
    assert torch.equal(pool.read_back(slot).cpu(), adapter.buffer)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("load"),
                st.dictionaries(st.sampled_from(LAYOUT.kinds), st.integers(1, 64), min_size=1),
            ),
            st.tuples(st.just("free"), st.integers(0, 100)),
        ),
        max_size=40,
    )
)
def test_random_load_and_free_keep_pages_tables_and_bytes_consistent(
    ops: list[tuple[str, object]],
) -> None:
    pool = LoraPool(LAYOUT, max_vram_adapters=6, max_rank=64, mean_rank=24)
    storages = [a.storage.data_ptr() for a in pool._arenas]
    capacity = pool.capacity_bytes
    expected: dict[int, HostAdapter] = {}
    for n, (op, arg) in enumerate(ops):
        if op == "free":
            assert isinstance(arg, int)
            if expected:
                slot = sorted(expected)[arg % len(expected)]
                pool.free(slot)
                del expected[slot]
            continue
        assert isinstance(arg, dict)
        adapter = host(arg, float(n))
        free = pool.free_pages()
        needs = [sum(adapter.ranks[k] for k in pool._arenas[a].kinds) for a in range(3)]
        fits = len(expected) < pool.num_slots and all(
            need <= left for need, left in zip(needs, free, strict=True)
        )
        assert pool.can_load(adapter) == fits
        if not fits:
            with pytest.raises(PoolFull):
                pool.load(adapter)
            continue
        slot = pool.load(adapter)
        assert slot not in expected
        expected[slot] = adapter
    assert pool.capacity_bytes == capacity
    assert [a.storage.data_ptr() for a in pool._arenas] == storages  # nothing reallocated
    assert pool.num_free == pool.num_slots - len(expected)
    assert pool.used_bytes == 4 * sum(a.buffer.numel() for a in expected.values())
    owner: dict[tuple[int, int], int] = {}  # (arena, page) -> slot
    for slot, adapter in expected.items():
        assert pool.ranks_of(slot) == adapter.ranks
        assert torch.equal(pool.read_back(slot), adapter.buffer)
        for kind, r in enumerate(adapter.ranks):
            pages = expand(pool.runs(slot, kind))
            assert len(pages) == r and 0 not in pages  # the zero page is never handed out
            assert pool.page_table[kind, slot].tolist() == pages + [0] * (64 - r)
            for page in pages:
                assert owner.setdefault((LAYOUT.kind_arenas[kind], page), slot) == slot
    used = [sum(1 for arena, _ in owner if arena == a) for a in range(3)]
    totals = [a.pages - 1 for a in pool._arenas]
    assert [u + f for u, f in zip(used, pool.free_pages(), strict=True)] == totals
    for module in range(len(LAYOUT.modules)):
        assert all(torch.all(view[0] == 0) for view in pool.module_views(module))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12)), max_size=40))
def test_page_runs_hand_out_each_free_page_once(ops: list[tuple[bool, int]]) -> None:
    runs = PageRuns(1, 40)
    held: list[list[tuple[int, int]]] = []
    for take, n in ops:
        if take and n <= runs.free:
            got = runs.take(n)
            assert sum(length for _, length in got) == n
            if any(length >= n for _, length in runs.runs + tuple(got)) and len(got) > 1:
                pytest.fail("a single run fitted but the pages were scattered")
            held.append(got)
        elif held:
            runs.give(held.pop(n % len(held)))
        taken = sorted(p for h in held for p in expand(h))
        free = expand(list(runs.runs))
        assert len(set(taken)) == len(taken)
        assert sorted(taken + free) == list(range(1, 41))
        assert runs.free == len(free)
        gaps = [b[0] - (a[0] + a[1]) for a, b in zip(runs.runs, runs.runs[1:], strict=False)]
        assert all(gap > 0 for gap in gaps)  # sorted, disjoint, merged


def test_pack_places_each_kinds_rows_with_the_scale_folded_into_b() -> None:
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    ranks = {q: 4, down: 2}
    tensors = {
        f"{q}.A": torch.randn(4, HIDDEN),
        f"{q}.B": torch.randn(HIDDEN, 4),
        f"{down}.A": torch.randn(2, INTER),
        f"{down}.B": torch.randn(HIDDEN, 2),
    }
    info = manifest(ranks, {q: 8.0, down: 3.0}, rslora=True)
    packed = pack_adapter(info, tensors, LAYOUT, pin=False)
    assert packed.ranks == (4, 0, 0, 0, 2) and packed.rank == 4
    assert packed.buffer.shape == (4 * ROW["q_proj"] + 2 * ROW["down_proj"],)
    # segment-major blocks: q's 4 rank rows, [A_l0 | A_l1 | Bt_l0 | Bt_l1], each [4, HIDDEN]
    q_block = packed.buffer[: 4 * ROW["q_proj"]].view(4, 4, HIDDEN)  # [segment, row, feature]
    assert torch.equal(q_block[0], tensors[f"{q}.A"])
    torch.testing.assert_close(q_block[2], tensors[f"{q}.B"].t() * (8 / math.sqrt(4)))
    assert torch.all(q_block[1] == 0) and torch.all(q_block[3] == 0)  # layer 1: not targeted
    down_block = packed.buffer[4 * ROW["q_proj"] :]  # 2 rows: [A_l0 | A_l1 | Bt_l0 | Bt_l1]
    a_l0, a_l1 = down_block[: 4 * INTER].view(2, 2, INTER)
    bt_l0, bt_l1 = down_block[4 * INTER :].view(2, 2, HIDDEN)
    assert torch.all(a_l0 == 0) and torch.all(bt_l0 == 0)  # layer 0: not targeted
    assert torch.equal(a_l1, tensors[f"{down}.A"])
    torch.testing.assert_close(bt_l1, tensors[f"{down}.B"].t() * (3 / math.sqrt(2)))
    out = torch.full((4000,), 9.0)
    into = pack_adapter(info, tensors, LAYOUT, out=out)
    assert into.buffer.data_ptr() == out.data_ptr()
    assert torch.equal(into.buffer, packed.buffer)
    with pytest.raises(InvalidAdapter, match="not among"):
        pack_adapter(
            manifest({"lm_head": 2}, {"lm_head": 1.0}),
            {"lm_head.A": torch.zeros(2, HIDDEN), "lm_head.B": torch.zeros(30, 2)},
            LAYOUT,
        )
    assert SPEC.modules["lm_head"] == (HIDDEN, 30)
