"""Eviction choices of the adapter tiers: pure, examples first, then Hypothesis invariants."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from vajra.policies.eviction import (
    lru_victim,
    resident_limit,
    threshold_victims,
    victims_to_fit,
)


def test_the_least_recent_idle_adapter_leaves() -> None:
    lru = ["a", "b", "c"]
    assert lru_victim(lru, lambda k: False) == "a"
    assert lru_victim(lru, {"a"}.__contains__) == "b"
    assert lru_victim(lru, {"a", "b", "c"}.__contains__) is None
    assert lru_victim([], lambda k: False) is None


def test_the_threshold_arithmetic() -> None:
    assert resident_limit(100, 0.9) == 90  # the paper's LRU_EVICTION_THRESHOLD
    assert resident_limit(4, 0.5) == 2
    assert resident_limit(3, 0.67) == 2  # int(2.01)
    assert resident_limit(2, 0.1) == 1  # never below one
    assert resident_limit(4, 1.0) == 4


def test_threshold_victims_skip_adapters_in_use() -> None:
    lru = ["a", "b", "c", "d"]
    assert threshold_victims(lru, lambda k: False, 4, 1.0) == []
    assert threshold_victims(lru, lambda k: False, 4, 0.5) == ["a", "b"]
    assert threshold_victims(lru, {"a"}.__contains__, 4, 0.5) == ["b", "c"]
    # Too many in use: fewer victims, never one in use.
    assert threshold_victims(lru, {"a", "b", "c"}.__contains__, 4, 0.5) == ["d"]
    assert threshold_victims(lru, set(lru).__contains__, 4, 0.25) == []


def test_threshold_victims_by_forecast_take_the_farthest_idle_first() -> None:
    lru = ["a", "b", "c", "d", "e"]  # least recently used first
    at = {"a": 10.0, "b": 500.0, "c": None, "d": 50.0, "e": 5.0}
    # Down to 2 of 4 slots: 3 leave. c (no arrival expected) ranks farthest, then b, then d.
    got = threshold_victims(lru, lambda k: False, 4, 0.5, next_arrival_ms=at.get, now_ms=0)
    assert got == ["c", "b", "d"]
    # b is in use: the next farthest idle ones leave instead.
    got = threshold_victims(lru, {"b"}.__contains__, 4, 0.5, next_arrival_ms=at.get, now_ms=0)
    assert got == ["c", "d", "a"]
    # Times already past all count as "now": ties keep the LRU order; NaN ranks farthest.
    past = {"a": -5.0, "b": -1.0, "c": float("nan"), "d": -9.0, "e": -2.0}
    got = threshold_victims(lru, lambda k: False, 4, 0.5, next_arrival_ms=past.get, now_ms=0)
    assert got == ["c", "a", "b"]
    # Without forecasts: plain LRU, as before.
    assert threshold_victims(lru, lambda k: False, 4, 0.5) == ["a", "b", "c"]


def test_disk_victims_make_just_enough_room() -> None:
    lru = [("a", 30), ("b", 30), ("c", 40)]
    assert victims_to_fit(lru, 100, 100, 0) == []
    assert victims_to_fit(lru, 100, 100, 1) == ["a"]
    assert victims_to_fit(lru, 100, 100, 31) == ["a", "b"]
    assert victims_to_fit(lru, 100, 120, 20) == []
    assert victims_to_fit(lru, 100, 100, 100) == ["a", "b", "c"]
    assert victims_to_fit([], 0, 10, 5) == []


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 20),
    extra=st.integers(0, 10),
    threshold=st.floats(0.01, 1.0),
    busy=st.sets(st.integers(0, 19)),
)
def test_threshold_victims_equal_evicting_one_at_a_time(
    n: int, extra: int, threshold: float, busy: set[int]
) -> None:
    """The same choice as the loop the tiers ran: evict the LRU idle adapter while above."""
    num_slots = n + extra
    if num_slots == 0:
        return
    victims = threshold_victims(range(n), busy.__contains__, num_slots, threshold)
    resident = OrderedDict.fromkeys(range(n))
    expected = []
    while len(resident) > max(1, int(num_slots * threshold)):
        victim = next((k for k in resident if k not in busy), None)
        if victim is None:
            break
        del resident[victim]
        expected.append(victim)
    assert victims == expected
    assert not set(victims) & busy


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), max_size=10),
    room=st.integers(0, 100),
    size=st.integers(0, 100),
)
def test_victims_to_fit_are_the_shortest_lru_prefix_that_fits(
    sizes: list[int], room: int, size: int
) -> None:
    used = sum(sizes)
    capacity = used + room
    victims = victims_to_fit(enumerate(sizes), used, capacity, size)
    assert victims == list(range(len(victims)))  # a prefix of the LRU order
    freed = sum(sizes[: len(victims)])
    if used - freed + size <= capacity:  # it fits now, and did not with one victim fewer
        assert not victims or used - freed + sizes[len(victims) - 1] + size > capacity
    else:
        assert len(victims) == len(sizes)  # nothing more to delete
