"""TrainParams, the cluster's bounds, the step plan and the interleaving rule (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vajra.errors import InvalidRequest
from vajra.policies.training import (
    InterleaveRule,
    TrainBounds,
    TrainParams,
    check_train_params,
    epoch_order,
    micro_batches,
    step_examples,
    total_optimizer_steps,
)


def test_round_trip_and_defaults() -> None:
    p = TrainParams(rank=16, target_modules=("q_proj", "k_proj"), seed=7)
    d = p.to_dict()
    assert d["target_modules"] == ["q_proj", "k_proj"]
    assert TrainParams.from_dict(d) == p
    assert TrainParams.from_dict({}) == TrainParams()
    assert TrainParams.from_dict({"epochs": 3.0, "learning_rate": 1}).epochs == 3
    assert p.scaling == 1.0 and p.examples_per_step == 4


@pytest.mark.parametrize(
    ("d", "field"),
    [
        ({"rnak": 8}, "rnak"),
        ({"rank": "8"}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 2.5}, "rank"),
        ({"rank": 0}, "rank"),
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"learning_rate": 2.0}, "learning_rate"),
        ({"batch_size": -1}, "batch_size"),
        ({"grad_accum_steps": 0}, "grad_accum_steps"),
        ({"max_steps": -1}, "max_steps"),
        ({"alpha": float("inf")}, "alpha"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": "q_proj"}, "target_modules"),
        ({"target_modules": ["q_proj", "q_proj"]}, "target_modules"),
        ({"target_modules": ["q.proj"]}, "target_modules"),
        ({"target_modules": [3]}, "target_modules"),
        ({"seed": -1}, "seed"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"max_micro_tokens": 0}, "max_micro_tokens"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing"),
        ({"checkpoint_every": -5}, "checkpoint_every"),
    ],
)
def test_bad_values_name_the_field(d: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        TrainParams.from_dict(d)
    assert caught.value.field == field


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidRequest):
        TrainParams.from_dict([("rank", 8)])  # type: ignore[arg-type]


def test_cluster_bounds() -> None:
    bounds = TrainBounds(max_rank=16, allowed_target_modules=("q_proj", "v_proj"))
    check_train_params(TrainParams(rank=16), bounds)
    for params, field in [
        (TrainParams(rank=32), "rank"),
        (TrainParams(epochs=101), "epochs"),
        (TrainParams(learning_rate=0.5), "learning_rate"),
        (TrainParams(batch_size=65), "batch_size"),
        (TrainParams(max_micro_tokens=10_000), "max_micro_tokens"),
        (TrainParams(target_modules=("q_proj", "o_proj")), "target_modules"),
    ]:
        with pytest.raises(InvalidRequest) as caught:
            check_train_params(params, bounds)
        assert caught.value.field == field


@given(
    n=st.integers(1, 50),
    batch=st.integers(1, 8),
    accum=st.integers(1, 3),
    epochs=st.integers(1, 3),
    max_steps=st.integers(0, 20),
    seed=st.integers(0, 2**63 - 1),
)
def test_step_plan_covers_each_epoch_once(
    n: int, batch: int, accum: int, epochs: int, max_steps: int, seed: int
) -> None:
    p = TrainParams(
        batch_size=batch, grad_accum_steps=accum, epochs=epochs, max_steps=max_steps, seed=seed
    )
    steps = step_examples(n, p)
    assert len(steps) == total_optimizer_steps(n, p)
    assert all(1 <= len(s) <= batch * accum for s in steps)
    per_epoch = -(-n // (batch * accum))
    if not max_steps or max_steps >= per_epoch * epochs:
        for e in range(epochs):
            flat = [i for s in steps[e * per_epoch : (e + 1) * per_epoch] for i in s]
            assert flat == epoch_order(n, seed, e)
            assert sorted(flat) == list(range(n))
    assert step_examples(n, p) == steps  # deterministic


@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=30),
    budget=st.integers(64, 300),
    rows=st.integers(1, 8),
)
def test_micro_batches_respect_budget_and_order(lengths: list[int], budget: int, rows: int) -> None:
    cuts = micro_batches(lengths, max_tokens=budget, max_rows=rows)
    assert [i for c in cuts for i in c] == list(range(len(lengths)))
    for c in cuts:
        assert 1 <= len(c) <= rows
        assert len(c) * max(lengths[i] for i in c) <= budget


def test_micro_batches_refuse_an_example_over_budget() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        micro_batches([10, 100], max_tokens=64, max_rows=4)


def run(rule: InterleaveRule, inference: list[bool], steps: int) -> list[str]:
    return [
        rule.next(inference_pending=inference[i % len(inference)], training_pending=True)
        for i in range(steps)
    ]


def test_preemption_on_inference_first_with_ratio_guard() -> None:
    rule = InterleaveRule(preemption_enabled=True, inference_ratio=10)
    seq = run(rule, [True], 33)
    assert seq[:10] == ["inference"] * 10 and seq[10] == "train"
    assert seq.count("train") == 3  # one micro-step per ten inference steps under load
    strict = InterleaveRule(preemption_enabled=True, inference_ratio=0)
    assert set(run(strict, [True], 50)) == {"inference"}
    assert run(strict, [False], 3) == ["train"] * 3
    idle = InterleaveRule()
    assert idle.next(inference_pending=False, training_pending=False) == "idle"
    assert idle.next(inference_pending=True, training_pending=False) == "inference"


def test_preemption_off_alternates() -> None:
    rule = InterleaveRule(preemption_enabled=False)
    assert run(rule, [True], 6) == ["inference", "train"] * 3
    with pytest.raises(InvalidRequest):
        InterleaveRule(inference_ratio=-1)


@given(st.lists(st.tuples(st.booleans(), st.booleans()), max_size=200), st.booleans())
def test_never_two_micro_steps_between_pending_inference(
    pending: list[tuple[bool, bool]], preempt: bool
) -> None:
    rule = InterleaveRule(preemption_enabled=preempt, inference_ratio=3)
    last = ""
    for inference, training in pending:
        choice = rule.next(inference_pending=inference, training_pending=training)
        if not training:
            assert choice != "train"
        if not inference:
            assert choice != "inference"
        if inference and last == "train":
            assert choice == "inference"
        if choice != "idle":
            last = choice
