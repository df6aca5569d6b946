"""Placement policy: pure, so Hypothesis checks its invariants directly."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vajra.policies.placement import ExecutorLoad, choose_executor, is_full, load_score

_loads = st.builds(
    ExecutorLoad,
    executor_id=st.text(alphabet="abcdef", min_size=1, max_size=4),
    inflight=st.integers(0, 600),
    max_batch_size=st.integers(1, 64),
    max_queue=st.integers(0, 512),
    draining=st.booleans(),
    reported_load=st.integers(0, 700),
)


@given(st.lists(_loads, max_size=8))
def test_choice_is_never_full_or_draining_and_is_least_loaded(loads: list[ExecutorLoad]) -> None:
    choice = choose_executor(loads)
    eligible = [e for e in loads if not e.draining and not is_full(e)]
    if not eligible:
        assert choice is None
        return
    assert choice is not None and choice in eligible
    assert load_score(choice) == max(load_score(e) for e in eligible)


def test_ties_break_deterministically() -> None:
    a = ExecutorLoad("b", 0, 8, 8)
    b = ExecutorLoad("a", 0, 8, 8)
    assert choose_executor([a, b]) == b
    assert choose_executor([b, a]) == b


@given(_loads)
def test_score_is_between_zero_and_one(e: ExecutorLoad) -> None:
    assert 0.0 <= load_score(e) <= 1.0
