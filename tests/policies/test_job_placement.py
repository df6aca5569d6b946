"""Training-job placement: Algorithm 2's score over executors with a free training slot."""

from __future__ import annotations

import random

from vajra.policies.job_placement import TrainingSlots, choose_job_executor
from vajra.policies.placement import ExecutorState, PlacementIndex, PlacementWeights, Tier

T, D = "t1", "d" * 64


def _index(*states: ExecutorState) -> PlacementIndex:
    idx = PlacementIndex(PlacementWeights(), affinity_window=4, affinity_ttl_ms=60_000.0)
    for s in states:
        idx.upsert_executor(s)
    return idx


def _state(eid: str, *, load: int = 0, base: str = "m", draining: bool = False) -> ExecutorState:
    return ExecutorState(
        eid, base, max_batch_size=8, max_queue=8, reported_load=load, draining=draining
    )


def test_prefers_the_executor_holding_the_starting_adapter_then_the_less_loaded() -> None:
    idx = _index(_state("a"), _state("b", load=4), _state("c", load=2))
    slots = [TrainingSlots(e, 0, 1) for e in "abc"]
    # Nobody holds the adapter: the least loaded.
    assert choose_job_executor(idx, (T, D), "m", slots, now_ms=0) == "a"
    # b holds it in GPU memory: locality outweighs b's load of 4 of 16 seats.
    idx.set_residency("b", (T, D), Tier.GPU)
    assert choose_job_executor(idx, (T, D), "m", slots, now_ms=0) == "b"
    # Another tenant's byte-identical adapter gives no locality to this tenant.
    assert choose_job_executor(idx, ("t2", D), "m", slots, now_ms=0) == "a"
    # A fresh adapter (no digest) has no locality anywhere.
    assert choose_job_executor(idx, (T, ""), "m", slots, now_ms=0) == "a"


def test_only_free_slots_of_the_base_model_and_not_draining() -> None:
    idx = _index(_state("a"), _state("b"), _state("c", base="other"), _state("d", draining=True))
    full = [
        TrainingSlots("a", 1, 1),
        TrainingSlots("b", 2, 2),
        TrainingSlots("c", 0, 4),
        TrainingSlots("d", 0, 4),
        TrainingSlots("e", 0, 4),
    ]  # e: unknown to the index
    assert choose_job_executor(idx, (T, D), "m", full, now_ms=0) is None
    assert choose_job_executor(idx, (T, D), "m", [TrainingSlots("a", 0, 0)], now_ms=0) is None
    free = [*full, TrainingSlots("b", 1, 2)]
    assert choose_job_executor(idx, (T, D), "m", free, now_ms=0) == "b"
    assert choose_job_executor(idx, (T, D), "m", [], now_ms=0) is None


def test_the_choice_is_the_best_score_with_ties_to_the_smallest_id() -> None:
    rng = random.Random(7)
    for _ in range(200):
        states = [_state(f"e{i:02d}", load=rng.randrange(0, 17)) for i in range(12)]
        idx = _index(*states)
        for s in states:
            if rng.random() < 0.3:
                idx.set_residency(s.executor_id, (T, D), rng.choice(list(Tier)[:3]))
        for _ in range(rng.randrange(0, 4)):
            idx.note_placement((T, D), rng.choice(states).executor_id, 0.0)
        slots = [TrainingSlots(s.executor_id, rng.randrange(0, 3), 2) for s in states]
        got = choose_job_executor(idx, (T, D), "m", slots, now_ms=0)
        holders = idx.holders((T, D))
        scored = [
            (
                -idx.score(
                    idx.executors[s.executor_id],
                    holders.get(s.executor_id, Tier.REMOTE),
                    idx.affinity((T, D), s.executor_id, 0),
                )[0],
                s.executor_id,
            )
            for s in slots
            if s.used < s.slots
        ]
        assert got == (min(scored)[1] if scored else None)
