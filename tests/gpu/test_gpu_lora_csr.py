"""The CSR kernel of the torch LoRA path (decode tokens of many adapters, one sparse matrix per
module kind) against the rank-bucket kernel and a per-token reference.

Rules: every expected value is recomputed token by token in float64 from the adapters' own A
and B (tests/gpu/lora_kit.py) or from the pages themselves, never from either kernel;
Hypothesis drives the pure row layout, the kernel and whole random batches.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.gpu.lora_kit import LAYOUT, SPEC, TARGETS, Adapter, make_adapter, reference_delta
from vajra.gpu.lora import LoraBatchState, LoraPool
from vajra.gpu.lora.segments import csr_rows
from vajra.gpu.lora.torch_kernels import lora_csr

KERNELS = ("csr", "union", "bmm", "auto")


def test_csr_rows_give_each_token_its_slot_and_exact_rank() -> None:
    ranks = {1: 4, 2: 64, 3: 0, 4: 5}
    # tokens 5..9 decode, token 7 a base token (no gather token), token 8 of a rank-0 kind
    gather = [(5, 1), (6, 2), (8, 3), (9, 4)]
    assert csr_rows(gather, ranks) == (5, 10, [1, 2, 0, 0, 4], [4, 64, 0, 0, 5])
    assert csr_rows([(3, 3), (4, 1), (9, 3)], ranks) == (4, 5, [1], [4])  # span: ranked only
    assert csr_rows([(0, 3)], ranks) == (0, 0, [], [])
    assert csr_rows([], ranks) == (0, 0, [], [])
    with pytest.raises(ValueError, match="not after"):
        csr_rows([(4, 1), (4, 2)], ranks)
    with pytest.raises(ValueError, match="not after"):
        csr_rows([(4, 1), (2, 2)], ranks)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(st.integers(0, 60), st.integers(0, 5), max_size=20),
    st.lists(st.integers(0, 9), min_size=6, max_size=6),
)
def test_csr_rows_cover_every_ranked_token_and_nothing_else(
    token_slots: dict[int, int], slot_ranks: list[int]
) -> None:
    rank_of = dict(enumerate(slot_ranks))
    gather = sorted(token_slots.items())
    lo, hi, slots, ranks = csr_rows(gather, rank_of)
    ranked = [t for t, s in gather if rank_of[s]]
    if not ranked:
        assert (lo, hi, slots, ranks) == (0, 0, [], [])
        return
    assert (lo, hi) == (ranked[0], ranked[-1] + 1)
    assert len(slots) == len(ranks) == hi - lo
    for token in range(lo, hi):
        slot = token_slots.get(token)
        if slot is not None and rank_of[slot]:
            assert (slots[token - lo], ranks[token - lo]) == (slot, rank_of[slot])
        else:
            assert ranks[token - lo] == 0


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=1, max_size=24),
    st.lists(st.integers(0, 9), min_size=4, max_size=4),
    st.integers(0, 1000),
)
def test_csr_kernel_matches_a_per_token_loop(
    slots: list[int | None], slot_ranks: list[int], seed: int
) -> None:
    """Scattered pages (any page, in any order), ranks 0-9, base tokens, one token."""
    gen = torch.Generator().manual_seed(seed)
    a, bt = torch.randn(40, 7, generator=gen), torch.randn(40, 3, generator=gen)
    table = [torch.randperm(39, generator=gen)[:9] + 1 for _ in range(4)]  # slot -> pages
    x = torch.randn(len(slots), 7, generator=gen)
    want = torch.zeros(len(slots), 3, dtype=torch.float64)
    for t, slot in enumerate(slots):
        if slot is not None:
            rows = table[slot][: slot_ranks[slot]]
            want[t] = (x[t].double() @ a[rows].double().t()) @ bt[rows].double()
    gather = [(t, s) for t, s in enumerate(slots) if s is not None]
    lo, hi, row_slots, row_ranks = csr_rows(gather, dict(enumerate(slot_ranks)))
    y = torch.zeros(len(slots), 3)
    if lo < hi:
        pages = torch.cat([table[s][:r] for s, r in zip(row_slots, row_ranks, strict=True)])
        crow = torch.tensor([0, *torch.tensor(row_ranks).cumsum(0).tolist()])
        # columns in the pages' order, unsorted within a row: the kernel's contract (torch's
        # invariant check would refuse it; the engine builds it unchecked)
        shrink = torch.sparse_csr_tensor(
            crow, pages, torch.ones(pages.numel()), (hi - lo, 40), check_invariants=False
        )
        lora_csr(x, y, lo, hi, shrink, a, bt)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@functools.cache
def _random_pool() -> tuple[LoraPool, dict[int, Adapter]]:
    """Seven adapters of ranks 4-64 per kind, some kinds and layers untargeted."""
    rng = random.Random(7)
    pool = LoraPool(LAYOUT, max_vram_adapters=8, max_rank=64, mean_rank=40)
    adapters = {}
    for seed in range(1, 8):
        kinds = rng.sample(TARGETS, rng.randint(1, len(TARGETS)))
        ranks = {kind: rng.choice([4, 5, 8, 13, 16, 31, 64]) for kind in kinds}
        layers = rng.choice([(0,), (1,), (0, 1)])
        adapter = make_adapter(ranks, seed, layers=layers)
        adapters[pool.load(adapter.host)] = adapter
    return pool, adapters


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 5), st.one_of(st.none(), st.integers(0, 6))),
        min_size=1,
        max_size=12,
    ),
    st.sampled_from(["auto", "gather"]),
)
def test_random_batches_agree_across_kernels_and_with_the_reference(
    layout: list[tuple[int, int, int | None]], mode: str
) -> None:
    """Random segments (gaps between them, base segments, one-token ones, prefill-length
    ones) over adapters of mixed ranks and targets: the CSR, union and bucket kernels equal
    the per-token reference, module by module (and so does "auto", which picks between the
    CSR and union kernels per kind)."""
    pool, adapters = _random_pool()
    slots = sorted(adapters)
    segments: list[tuple[int, int, int | None]] = []
    token_slots: list[int | None] = []
    for gap, length, which in layout:
        token_slots += [None] * gap
        slot = None if which is None else slots[which]
        segments.append((len(token_slots), length, slot))
        token_slots += [slot] * length
    num_tokens = len(token_slots)
    gen = torch.Generator().manual_seed(num_tokens)
    inputs = {m: torch.randn(num_tokens, SPEC.modules[m][0], generator=gen) for m in LAYOUT.modules}
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    for kernel in KERNELS:
        state = LoraBatchState(pool, mode=mode, gather_kernel=kernel)  # type: ignore[arg-type]
        state.set_segments(segments, num_tokens)
        deltas[kernel] = {}
        for index, module in enumerate(LAYOUT.modules):
            y = torch.full((1, num_tokens, SPEC.modules[module][1]), 0.25)
            got = state.apply(index, inputs[module].unsqueeze(0), y)[0].double() - 0.25
            deltas[kernel][module] = got
        state.clear()
    for module, x in inputs.items():
        want = reference_delta(x, token_slots, adapters, module)
        for kernel in KERNELS:
            error = (deltas[kernel][module] - want).abs().max().item()
            assert error <= 1e-5, (kernel, module, error)


def test_csr_kernel_needs_a_float_pool_on_the_cpu_and_auto_falls_back() -> None:
    pool = LoraPool(LAYOUT, max_vram_adapters=2, mean_rank=8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CSR kernel"):
        LoraBatchState(pool, gather_kernel="csr")
    state = LoraBatchState(pool)
    assert state.gather_kernel == "bmm"
    assert LoraBatchState(_random_pool()[0]).gather_kernel == "cost"
    slots = [pool.load(make_adapter({"q_proj": 8}, seed=s).host) for s in (1, 2)]
    adapters = {
        slot: make_adapter({"q_proj": 8}, seed=s) for slot, s in zip(slots, (1, 2), strict=True)
    }
    state.segment_max_groups = 0  # the bucket kernel even for two adapters
    state.set_segments([(0, 1, slots[0]), (1, 1, None), (2, 1, slots[1])], 3)
    module = "model.layers.0.self_attn.q_proj"
    x = torch.randn(1, 3, 16)
    got = state.apply(LAYOUT.index(module), x.bfloat16(), torch.zeros(1, 3, 16).bfloat16())
    state.clear()
    want = reference_delta(x[0], [slots[0], None, slots[1]], adapters, module)
    torch.testing.assert_close(got[0].double(), want, rtol=0.05, atol=0.05)
