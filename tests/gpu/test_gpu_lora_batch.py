"""One packed batch through the multi-LoRA layer: segments, the torch kernels, the batch state.

Rules: every expected value is recomputed token by token in float64 from the adapters' own A
and B (tests/gpu/lora_kit.py); Hypothesis drives the pure segment functions and the kernels.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.gpu.lora_kit import (
    LAYOUT,
    SPEC,
    check_packed_batch,
    group_check,
    make_adapter,
    mixed_pool,
    packed_batch,
    reference_delta,
    token_slots,
)
from vajra.gpu.lora import LoraBatchState, LoraPool, lora_bgmv, lora_sgmv
from vajra.gpu.lora.segments import gather_buckets, segment_blocks, split_segments


def test_split_segments_drops_base_segments_and_splits_by_length() -> None:
    segments = [(0, 1, 3), (1, 1, None), (2, 2, 5), (6, 4, 3), (10, 1, 5)]
    gather, long = split_segments(segments, 12, gather_max_tokens=1)
    assert gather == [(0, 3), (10, 5)]
    assert long == [(2, 2, 5), (6, 4, 3)]
    gather, long = split_segments(segments, 12, gather_max_tokens=2)
    assert gather == [(0, 3), (2, 5), (3, 5), (10, 5)] and long == [(6, 4, 3)]
    adjacent = [(0, 3, 1), (3, 2, 1), (5, 4, 2), (9, 1, 2), (10, 2, 2)]
    _, long = split_segments(adjacent, 12, gather_max_tokens=1)
    assert long == [(0, 5, 1), (5, 4, 2), (10, 2, 2)]  # one adapter's neighbours merge
    for bad in ([(0, 2, 1), (1, 1, 1)], [(3, 1, 1), (2, 1, 1)], [(0, 0, 1)], [(11, 2, 1)]):
        with pytest.raises(ValueError, match="segment"):
            split_segments(bad, 12, gather_max_tokens=1)


def test_gather_buckets_group_tokens_by_the_power_of_two_above_their_rank() -> None:
    gather = [(0, 1), (1, 2), (2, 3), (3, 1), (4, 4)]
    ranks = {1: 4, 2: 64, 3: 0, 4: 5}
    assert gather_buckets(gather, ranks) == [(4, [0, 3], [1, 1]), (8, [4], [4]), (64, [1], [2])]
    assert segment_blocks([(5, 70, 1), (80, 3, 2)], 32) == [
        (5, 32, 1),
        (37, 32, 1),
        (69, 6, 1),
        (80, 3, 2),
    ]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=1, max_size=24),
    st.integers(1, 8),
)
def test_torch_kernels_match_a_per_token_loop(slots: list[int | None], width: int) -> None:
    torch.manual_seed(len(slots) * 10 + width)
    a, bt = torch.randn(20, 7), torch.randn(20, 3)
    a[0], bt[0] = 0.0, 0.0  # the zero page
    pages = torch.randint(1, 20, (4, width), dtype=torch.int32)
    x = torch.randn(len(slots), 7)
    want = torch.zeros(len(slots), 3, dtype=torch.float64)
    for t, slot in enumerate(slots):
        if slot is not None:
            rows = pages[slot].long()
            want[t] = (x[t].double() @ a[rows].double().t()) @ bt[rows].double()
    tokens = [t for t, s in enumerate(slots) if s is not None]
    gathered = torch.zeros(len(slots), 3)
    if tokens:
        index = torch.tensor(tokens, dtype=torch.int32)
        token_pages = pages[torch.tensor([slots[t] for t in tokens])]
        lora_bgmv(x, gathered, index, token_pages, a, bt)
    segmented = torch.zeros(len(slots), 3)
    for t, slot in enumerate(slots):  # every token its own one-token segment
        if slot is not None:
            rows = pages[slot].long()
            lora_sgmv(x, segmented, t, t + 1, a[rows], bt[rows])
    torch.testing.assert_close(gathered.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(segmented.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("columns", [False, True])
@pytest.mark.parametrize("kernel", ["csr", "union", "bmm"])
@pytest.mark.parametrize(
    ("mode", "groups"), [("auto", 2), ("auto", 3), ("gather", 2), ("segmented", 2)]
)
def test_packed_batch_of_mixed_ranks_and_targets_equals_a_per_token_reference(
    mode: str, groups: int, kernel: str, columns: bool
) -> None:
    """Base tokens, decode tokens of ranks 4, 16 and 64 adapters on different modules, two
    prefill chunks and an uncovered token, in one [1, T] forward, float32. (With
    ``segment_max_groups`` 3 the decode tokens go per adapter, with 2 by ``kernel``: one
    sparse matrix per kind, one dense matmul against all adapters' rows, or rank buckets.)
    With ``columns``, each module's output is its columns of a merged projection, written
    in place."""
    pool, names, adapters = mixed_pool()
    state = LoraBatchState(
        pool,
        mode=mode,  # type: ignore[arg-type]
        backend="torch",
        segment_max_groups=groups,
        gather_kernel=kernel,  # type: ignore[arg-type]
    )
    check_packed_batch(state, names, adapters, tol=1e-5, columns=columns)
    assert not state.active  # cleared after the forward
    segments, num_tokens = packed_batch(names)
    state.set_segments(segments, num_tokens)  # the attention modules as one group
    group_check(state, token_slots(segments, num_tokens), adapters, tol=1e-5)
    state.clear()
    x, y = torch.randn(1, 75, 16), torch.ones(1, 75, 16)
    assert torch.equal(state.apply(0, x, y.clone()), y)  # nothing set: the base alone


def test_scattered_pages_compute_the_same_as_contiguous_ones() -> None:
    pool, names, adapters = mixed_pool(max_vram_adapters=40, mean_rank=8)
    contiguous = check_packed_batch(LoraBatchState(pool), names, adapters, tol=1e-5)
    big = names["r64-all-layer1"]
    pool.free(big)
    filler = make_adapter(dict.fromkeys(LAYOUT.kinds, 16), seed=9).host
    fillers = []
    while pool.can_load(filler):  # memory runs out before slot ids do
        fillers.append(pool.load(filler))
    for slot in fillers[::2]:  # holes of 16 pages per kind, none of 64
        pool.free(slot)
    slot = pool.load(adapters[big].host)
    assert all(len(pool.runs(slot, k)) > 1 for k in range(len(LAYOUT.kinds)))
    moved = {**{s: a for s, a in adapters.items() if s != big}, slot: adapters[big]}
    renamed = {**names, "r64-all-layer1": slot}
    for mode, groups, kernel in (
        ("auto", 2, "csr"),
        ("auto", 2, "union"),
        ("auto", 2, "bmm"),
        ("auto", 3, "csr"),
        ("gather", 2, "csr"),
        ("gather", 2, "bmm"),
        ("segmented", 2, "csr"),
    ):
        state = LoraBatchState(
            pool,
            mode=mode,  # type: ignore[arg-type]
            segment_max_groups=groups,
            gather_kernel=kernel,  # type: ignore[arg-type]
        )
        scattered = check_packed_batch(state, renamed, moved, tol=1e-5)
        for module, delta in contiguous.items():  # float32 sums in other orders: a few ulps
            torch.testing.assert_close(scattered[module], delta, rtol=4e-6, atol=1e-6)


def test_row_form_lays_rows_out_as_segments_for_each_shape_it_sees() -> None:
    pool, names, adapters = mixed_pool()
    state = LoraBatchState(pool, max_rows=2)
    rows = [names["r16-kod"], None, names["r64-all-layer1"], names["r4-qv"]]
    module = "model.layers.1.self_attn.k_proj"
    index = LAYOUT.index(module)
    with state.rows(rows):
        for tokens in (5, 1, 1):  # a prefill, then decode steps
            x = torch.randn(len(rows), tokens, 16)
            got = state.apply(index, x, torch.zeros(len(rows), tokens, 8))
            slots = [s for s in rows for _ in range(tokens)]
            want = reference_delta(x.reshape(-1, 16), slots, adapters, module)
            torch.testing.assert_close(got.reshape(-1, 8).double(), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="equal rows"):
            state.apply(index, torch.randn(3, 1, 16), torch.zeros(3, 1, 8))
    assert not state.active


def test_steady_state_steps_reuse_the_index_buffer() -> None:
    pool, names, _ = mixed_pool()
    state = LoraBatchState(pool, max_tokens=8)
    segments, num_tokens = packed_batch(names)
    state.set_segments(segments, num_tokens)  # larger than any before: grows once
    buffer = state._index.data_ptr()
    for _ in range(3):
        state.set_segments(segments, num_tokens)
        state.set_segments(segments[:4], num_tokens)
        assert state._index.data_ptr() == buffer
    state.clear()


def test_bad_batches_are_refused() -> None:
    pool, names, _ = mixed_pool()
    state = LoraBatchState(pool)
    free = next(s for s in range(pool.num_slots) if not pool.is_loaded(s))
    with pytest.raises(KeyError, match=f"slot {free}"):
        state.set_segments([(0, 1, None), (1, 1, free)], 2)
    with pytest.raises(KeyError, match=f"slot {free}"):
        state.set_rows([None, free])
    state.set_segments([(0, 2, names["r4-qv"])], 2)
    with pytest.raises(ValueError, match="3 tokens"):
        state.apply(0, torch.randn(1, 3, 16), torch.zeros(1, 3, 16))
    state.set_segments([(0, 2, None)], 2)  # no adapter at all: nothing to do
    assert not state.active


def test_base_model_modules_untargeted_by_the_batch_are_left_alone() -> None:
    pool = LoraPool(LAYOUT, max_vram_adapters=2, mean_rank=8)
    adapter = make_adapter({"q_proj": 8}, seed=3)
    slot = pool.load(adapter.host)
    state = LoraBatchState(pool)
    state.set_segments([(0, 4, slot), (4, 1, slot)], 5)
    for index, module in enumerate(LAYOUT.modules):
        in_f, out_f = SPEC.modules[module]
        x, y = torch.randn(1, 5, in_f), torch.ones(1, 5, out_f)
        got = state.apply(index, x, y.clone())
        if "q_proj" not in module:
            assert torch.equal(got, y), module
        else:
            want = reference_delta(x[0], [slot] * 5, {slot: adapter}, module)
            torch.testing.assert_close((got[0] - 1).double(), want, rtol=1e-5, atol=1e-5)
    state.clear()
