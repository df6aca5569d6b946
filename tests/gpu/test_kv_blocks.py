"""The paged KV cache's bookkeeping: allocation, release, the prefix cache and its eviction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vajra.gpu.interface import GenerationRequest
from vajra.gpu.kv_blocks import BlockManager, block_keys
from vajra.gpu.step_planner import Sequence
from vajra.policies.decoding import SamplingParams


def test_keys_chain_namespace_and_every_earlier_block() -> None:
    tokens = list(range(40))
    keys = block_keys("", tokens, 16)
    assert len(keys) == 2  # the partial third block has no key
    assert block_keys("", tokens[:32], 16) == keys
    assert block_keys("adapter-v2", tokens, 16)[0] != keys[0]
    changed = [99, *tokens[1:]]
    assert block_keys("", changed, 16)[1] != keys[1]  # a different first block changes the chain


def test_a_chain_extends_from_its_last_key_as_a_sequence_grows() -> None:
    tokens = list(range(100, 170))
    keys = block_keys("ns", tokens, 16)
    assert block_keys("ns", tokens[32:], 16, after=keys[1]) == keys[2:]
    request = GenerationRequest("r", "", SamplingParams(), None)
    seq = Sequence(
        request, prompt_len=20, tokens=tokens[:20], namespace="ns", sampler=None, text=None
    )
    assert seq.keys_upto(1, 16) == keys[:1]
    for token in tokens[20:]:  # decoding: one token at a time, keys asked for as blocks fill
        seq.tokens.append(token)
        assert seq.keys_upto(len(seq.tokens) // 16, 16) == keys[: len(seq.tokens) // 16]
    assert seq.keys == keys
    other = Sequence(
        request, prompt_len=70, tokens=tokens, namespace="other", sampler=None, text=None
    )
    assert other.keys_upto(4, 16)[0] != keys[0]  # the namespace starts the chain


def test_allocate_is_all_or_nothing() -> None:
    bm = BlockManager(4, 16)
    first = bm.allocate(3)
    assert first is not None and len(set(first)) == 3
    assert bm.allocate(2) is None
    assert bm.num_available == 1
    bm.release(first)
    assert bm.num_available == 4


def test_published_blocks_are_reused_and_then_evicted_oldest_first() -> None:
    bm = BlockManager(3, 4)
    a = bm.allocate(1)
    b = bm.allocate(1)
    assert a is not None and b is not None
    bm.publish(a[0], 111)
    bm.publish(b[0], 222)
    bm.release(a)
    bm.release(b)
    assert bm.num_available == 3 and bm.num_cached == 2
    assert bm.match([111]) == a  # a hit takes a reference
    assert bm.num_available == 2
    bm.release(a)
    fresh = bm.allocate(2)  # one free block, then the least recently released cached one
    assert fresh is not None and b[0] in fresh
    assert bm.match([222]) == [] and bm.match([111]) == a
    assert bm.stats.evictions == 1


def test_match_stops_at_the_first_miss_and_a_shared_block_is_not_freed_early() -> None:
    bm = BlockManager(4, 4)
    blocks = bm.allocate(2)
    assert blocks is not None
    bm.publish(blocks[0], 1)
    bm.publish(blocks[1], 2)
    assert bm.match([1, 3, 2]) == [blocks[0]]
    bm.release(blocks)  # the owner leaves; the matcher still holds block 0
    assert bm.allocate(4) is None
    assert bm.num_available == 3


def test_a_second_publisher_of_the_same_key_stays_private() -> None:
    bm = BlockManager(2, 4)
    one, two = bm.allocate(1), bm.allocate(1)
    assert one is not None and two is not None
    bm.publish(one[0], 7)
    bm.publish(two[0], 7)
    bm.release(two)
    assert bm.num_cached == 1 and bm.match([7]) == one


def test_double_release_is_refused() -> None:
    bm = BlockManager(2, 4)
    blocks = bm.allocate(1)
    assert blocks is not None
    bm.release(blocks)
    with pytest.raises(ValueError):
        bm.release(blocks)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3)), max_size=40))
def test_blocks_are_never_lost_or_handed_out_twice(ops: list[tuple[bool, int]]) -> None:
    bm = BlockManager(8, 4)
    held: list[list[int]] = []
    key = 0
    for allocate, n in ops:
        if allocate or not held:
            got = bm.allocate(n)
            if got is not None:
                key += 1
                bm.publish(got[0], key)
                held.append(got)
        else:
            bm.release(held.pop(0))
        owned = [b for blocks in held for b in blocks]
        assert len(owned) == len(set(owned))
        assert bm.num_used == len(owned)
    for blocks in held:
        bm.release(blocks)
    assert bm.num_available == 8
