"""Sampling parameters and the pure next-token function."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vajra.errors import InvalidRequest
from vajra.gpu.sampling import (
    BAD_ROW,
    SamplingParams,
    make_generator,
    sample_next_tokens,
    sample_row,
)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ("",)}, "stop"),
        ({"temperature": 6.0}, "temperature"),  # request_rules.TEMPERATURE_MAX is 5
        ({"top_p": float("nan")}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_greedy_rows_take_the_argmax_and_need_no_generator() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, -1.0, 4.9]])
    params = [SamplingParams(), SamplingParams(seed=1)]
    assert make_generator(params[1], "cpu") is None
    assert sample_next_tokens(logits, params, [None, None]).tolist() == [1, 0]


def test_a_seeded_row_draws_the_same_whatever_its_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(temperature=1.0, seed=11)
    alone = [sample_row(logits[2], 1.0, 1.0, make_generator(p, "cpu")) for _ in range(3)]
    params = [SamplingParams(), SamplingParams(temperature=0.7, seed=5), p, SamplingParams()]
    generators = [make_generator(q, "cpu") for q in params]
    batched = sample_next_tokens(logits, params, generators)
    assert all(int(t) == int(batched[2]) for t in alone)


def test_same_seed_same_stream_and_seeds_differ() -> None:
    logits = torch.zeros(1000)  # uniform: every draw is informative

    def draws(seed: int) -> list[int]:
        g = make_generator(SamplingParams(temperature=1.0, seed=seed), "cpu")
        return [int(sample_row(logits, 1.0, 1.0, g)) for _ in range(8)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


@settings(max_examples=100, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20), min_size=2, max_size=40),
    top_p=st.floats(0.01, 1.0),
    temperature=st.floats(0.05, 4.0),
    seed=st.integers(0, 2**32),
)
def test_nucleus_draws_stay_in_the_nucleus(
    logits: list[float], top_p: float, temperature: float, seed: int
) -> None:
    row = torch.tensor(logits, dtype=torch.float64)
    probs = torch.softmax(row.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    nucleus = set(order[mass_before < top_p].tolist())
    generator = torch.Generator().manual_seed(seed)
    token = int(sample_row(row, temperature, top_p, generator))
    assert token in nucleus


def test_tiny_top_p_is_greedy() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 100)
    params = [SamplingParams(temperature=1.5, top_p=1e-6, seed=i) for i in range(8)]
    generators = [make_generator(p, "cpu") for p in params]
    assert torch.equal(sample_next_tokens(logits, params, generators), logits.argmax(-1))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_row_with_nan_or_inf_gets_bad_row_and_the_others_are_sampled(
    poison: float, temperature: float
) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    logits[1, 7] = poison
    params = [SamplingParams(temperature=temperature, seed=i) for i in range(3)]
    gens = [make_generator(p, "cpu") for p in params]
    tokens = sample_next_tokens(logits, params, gens).tolist()
    assert tokens[1] == BAD_ROW
    clean = torch.cat([logits[:1], logits[2:]])
    gens = [make_generator(p, "cpu") for p in (params[0], params[2])]
    assert [tokens[0], tokens[2]] == sample_next_tokens(
        clean, [params[0], params[2]], gens
    ).tolist()


def test_a_row_of_all_minus_infinity_is_bad_but_one_minus_infinity_is_fine() -> None:
    logits = torch.zeros(2, 5)
    logits[0, :] = float("-inf")
    logits[1, 2] = float("-inf")
    params = [SamplingParams(temperature=1.0, seed=1)] * 2
    tokens = sample_next_tokens(logits, params, [make_generator(p, "cpu") for p in params])
    assert tokens[0] == BAD_ROW and tokens[1] != 2 and tokens[1] >= 0
