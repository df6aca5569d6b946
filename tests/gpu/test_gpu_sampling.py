"""The batched sampler against a one-row-at-a-time reference of vajra.policies.decoding.

Rules: CPU tensors only; every random input comes from a fixed seed; the reference is written
from the decoding contract alone, in float64, one row at a time.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from vajra.errors import InvalidRequest
from vajra.gpu.sampling import BAD_ROW, RowSampler, Sampler, prompt_logprobs
from vajra.policies.decoding import SamplingParams

EOS = 2
V = 64


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def sampler(tokenizer: Any) -> Sampler:
    return Sampler(
        vocab_size=V, device="cpu", eos_token_ids=[EOS], tokenizer=tokenizer, max_rows=64
    )


class Reference:
    """One request decoded by the contract, one row at a time (float64)."""

    def __init__(self, params: SamplingParams, prompt: list[int]) -> None:
        self.p = params
        self.prompt = set(prompt)
        self.counts: dict[int, int] = {}
        self.n = 0
        self.rng = random.Random(params.seed) if not params.greedy else None

    def penalised(self, logits: torch.Tensor) -> torch.Tensor:
        x = logits.double().clone()
        for t in range(x.shape[0]):
            if t in self.prompt or t in self.counts:
                r = self.p.repetition_penalty
                x[t] = x[t] / r if x[t] > 0 else x[t] * r
            c = self.counts.get(t, 0)
            x[t] -= self.p.presence_penalty * (c > 0) + self.p.frequency_penalty * c
        return x

    def distribution(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The final probabilities (None: greedy)."""
        x = self.penalised(logits)
        early = self.n < self.p.min_tokens
        if self.p.ignore_eos or early:
            x[EOS] = -math.inf
        if early:
            for t in self.p.stop_token_ids:
                x[t] = -math.inf
        if self.p.greedy:
            self.greedy_logits = x
            return None
        s = x / self.p.temperature
        order = sorted(range(len(s)), key=lambda t: -float(s[t]))
        keep = order[: self.p.top_k] if self.p.top_k else order
        probs = torch.softmax(s[keep], dim=0)
        mass, nucleus = 0.0, []
        for t, q in zip(keep, probs.tolist(), strict=True):
            if mass >= self.p.top_p:
                break
            nucleus.append(t)
            mass += q
        out = torch.zeros_like(s)
        out[nucleus] = torch.softmax(s[nucleus], dim=0)
        return out

    def next(self, logits: torch.Tensor) -> int:
        probs = self.distribution(logits)
        if probs is None:
            token = int(self.greedy_logits.argmax())
        else:
            assert self.rng is not None
            u = self.rng.random()
            cdf = probs.cumsum(0)
            token = int(torch.searchsorted(cdf, u * cdf[-1], right=True))
        self.n += 1
        self.counts[token] = self.counts.get(token, 0) + 1
        return token


def random_params(rng: random.Random) -> SamplingParams:
    greedy = rng.random() < 0.3
    return SamplingParams(
        max_tokens=50,
        temperature=0.0 if greedy else rng.choice([0.3, 0.7, 1.0, 1.6]),
        top_k=rng.choice([0, 0, 1, 5, 20]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
        seed=rng.randrange(2**32),
        min_tokens=rng.choice([0, 0, 3]),
        stop_token_ids=rng.choice([(), (5, 9)]),
        ignore_eos=rng.random() < 0.2,
        presence_penalty=rng.choice([0.0, 0.0, 0.5, -0.5]),
        frequency_penalty=rng.choice([0.0, 0.0, 0.3]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
    )


@pytest.mark.parametrize("case", range(12))
def test_the_batch_equals_the_reference_row_by_row(sampler: Sampler, case: int) -> None:
    rng = random.Random(case)
    params = [random_params(rng) for _ in range(rng.randint(1, 12))]
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 8))] for _ in params]
    rows = [sampler.new_row(p, prompt) for p, prompt in zip(params, prompts, strict=True)]
    refs = [Reference(p, prompt) for p, prompt in zip(params, prompts, strict=True)]
    gen = torch.Generator().manual_seed(case)
    for _ in range(8):
        logits = torch.randn(len(rows), V, generator=gen) * 3
        logits[:, EOS] += 4  # EOS is often the favourite: the masks matter
        tokens = sampler.sample(logits, rows).to_host().tokens
        assert tokens == [ref.next(logits[i]) for i, ref in enumerate(refs)]
        for row, token in zip(rows, tokens, strict=True):
            assert not row.accept(token)


@pytest.mark.parametrize("banned", [False, True])  # with a ban, x is edited before its argmax
def test_greedy_rows_take_the_argmax_and_have_no_random_stream(
    sampler: Sampler, banned: bool
) -> None:
    logits = torch.zeros(3, V)
    logits[0, 1], logits[1, 0], logits[1, 3] = 3.0, 5.0, 4.9
    logits[2, 4], logits[2, 6] = 2.0, 2.0  # a tie: the first of them
    rows = [sampler.new_row(SamplingParams(), [1]), sampler.new_row(SamplingParams(seed=1), [1])]
    rows.append(sampler.new_row(SamplingParams(ignore_eos=banned), [1]))
    assert all(row.rng is None for row in rows)
    assert sampler.sample(logits, rows).to_host().tokens == [1, 0, 4]


def draws(sampler: Sampler, row: RowSampler, logits: torch.Tensor, others: int) -> list[int]:
    """The row's tokens over len(logits) steps, at a varying place among ``others`` rows."""
    out = []
    for step, row_logits in enumerate(logits):
        rng = random.Random(step)
        crowd = [
            sampler.new_row(SamplingParams(temperature=rng.random() + 0.1, top_k=3), [1])
            for _ in range(others)
        ]
        at = rng.randint(0, others)
        batch = [*crowd[:at], row, *crowd[at:]]
        stacked = torch.randn(len(batch), V)
        stacked[at] = row_logits
        out.append(sampler.sample(stacked, batch).to_host().tokens[at])
    return out


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=0.8, seed=12, top_k=7),
        SamplingParams(temperature=1.2, seed=13, top_p=0.8),
        SamplingParams(temperature=1.2, seed=14, top_p=0.8, top_k=30),
    ],
)
def test_a_seeded_row_draws_the_same_whatever_its_batch(
    sampler: Sampler, params: SamplingParams
) -> None:
    logits = torch.randn(20, V, generator=torch.Generator().manual_seed(0))
    alone = draws(sampler, sampler.new_row(params, [1]), logits, others=0)
    crowded = draws(sampler, sampler.new_row(params, [1]), logits, others=9)
    assert alone == crowded
    assert len(set(alone)) > 3  # it did sample


def test_same_seed_same_stream_and_seeds_differ(sampler: Sampler) -> None:
    logits = torch.zeros(1, V)

    def run(seed: int | None) -> list[int]:
        row = sampler.new_row(SamplingParams(temperature=1.0, seed=seed), [1])
        return [sampler.sample(logits, [row]).to_host().tokens[0] for _ in range(10)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(None) != run(None)


def test_top_k_draws_stay_in_the_top_k_and_top_k_1_is_greedy(sampler: Sampler) -> None:
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(3))
    top5 = set(logits[0].topk(5).indices.tolist())
    row = sampler.new_row(SamplingParams(temperature=5.0, top_k=5, seed=1), [1])
    seen = {sampler.sample(logits, [row]).to_host().tokens[0] for _ in range(200)}
    assert seen == top5
    one = sampler.new_row(SamplingParams(temperature=5.0, top_k=1, seed=1), [1])
    assert sampler.sample(logits, [one]).to_host().tokens == [int(logits.argmax())]


@settings(max_examples=100, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20), min_size=V, max_size=V),
    top_p=st.floats(0.01, 1.0),
    top_k=st.sampled_from([0, 0, 3, 10]),
    temperature=st.floats(0.05, 4.0),
    seed=st.integers(0, 2**32),
)
def test_draws_stay_in_the_nucleus_of_the_top_k(
    tokenizer: Any, logits: list[float], top_p: float, top_k: int, temperature: float, seed: int
) -> None:
    sampler = Sampler(vocab_size=V, device="cpu", eos_token_ids=[], tokenizer=tokenizer, max_rows=1)
    row = torch.tensor(logits)
    s = row.double() / temperature
    values = s.sort(descending=True).values[: top_k or V]
    probs = torch.softmax(values, 0)
    last = int(((probs.cumsum(0) - probs) < top_p).sum()) - 1
    allowed = set((s >= values[last]).nonzero().flatten().tolist())  # ties at the cut are kept
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    token = sampler.sample(row[None], [sampler.new_row(params, [1])]).to_host().tokens[0]
    assert token in allowed


def test_a_tiny_top_p_is_greedy(sampler: Sampler) -> None:
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(1))
    rows = [
        sampler.new_row(SamplingParams(temperature=1.5, top_p=1e-6, seed=i), [1]) for i in range(8)
    ]
    assert sampler.sample(logits, rows).to_host().tokens == logits.argmax(-1).tolist()


def test_penalties_by_hand(sampler: Sampler) -> None:
    """Prompt [3, 4, 4]; completion [4, 4, 5]; repetition 2, presence 0.5, frequency 0.25.
    Token 4 is in both and twice in each: the repetition penalty applies to it once."""
    params = SamplingParams(
        repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=0
    )
    row = sampler.new_row(params, [3, 4, 4])
    for token in (4, 4, 5):
        row.accept(token)
    logits = torch.zeros(1, V)
    logits[0, 3:7] = torch.tensor([2.0, -1.0, 3.0, 1.2])
    expected = logits[0].clone().double()
    expected[3] = 2.0 / 2  # prompt: repetition only
    expected[4] = -1.0 * 2 - 0.5 - 0.25 * 2
    expected[5] = 3.0 / 2 - 0.5 - 0.25
    # token 6 was never seen: unchanged, and now the most likely
    entry = sampler.sample(logits, [row]).to_host().logprobs[0]
    assert entry is not None
    assert entry.token_id == 6
    assert entry.logprob == pytest.approx(float(torch.log_softmax(expected, 0)[6]), abs=1e-5)


def test_min_tokens_masks_eos_and_stop_tokens_then_lets_them_through(sampler: Sampler) -> None:
    logits = torch.zeros(1, V)
    logits[0, EOS], logits[0, 9], logits[0, 7] = 10.0, 9.0, 8.0
    row = sampler.new_row(SamplingParams(min_tokens=2, stop_token_ids=(9,)), [1])
    seen = []
    for _ in range(3):
        seen.append(sampler.sample(logits, [row]).to_host().tokens[0])
        row.accept(seen[-1])
    assert seen == [7, 7, EOS]
    ignoring = sampler.new_row(SamplingParams(ignore_eos=True, stop_token_ids=(9,)), [1])
    assert sampler.sample(logits, [ignoring]).to_host().tokens == [9]


@pytest.mark.parametrize("poison", ["nan", "inf", "all -inf", "all masked"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_bad_row_gets_bad_row_and_the_others_are_unaffected(
    sampler: Sampler, poison: str, temperature: float
) -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=temperature, seed=i, logprobs=2) for i in range(3)]
    if poison == "nan":
        logits[1, 7] = float("nan")
    elif poison == "inf":
        logits[1, 7] = float("inf")
    elif poison == "all -inf":
        logits[1] = float("-inf")
    else:  # only EOS is possible, and min_tokens forbids it
        logits[1] = float("-inf")
        logits[1, EOS] = 1.0
        params[1] = SamplingParams(temperature=temperature, seed=1, min_tokens=1)
    host = sampler.sample(logits, [sampler.new_row(p, [1]) for p in params]).to_host()
    assert host.tokens[1] == BAD_ROW and host.logprobs[1] is None
    clean = torch.cat([logits[:1], logits[2:]])
    alone = sampler.sample(clean, [sampler.new_row(params[i], [1]) for i in (0, 2)]).to_host()
    assert [host.tokens[0], host.tokens[2]] == alone.tokens
    assert [host.logprobs[0], host.logprobs[2]] == alone.logprobs


def test_one_minus_infinity_is_fine(sampler: Sampler) -> None:
    logits = torch.zeros(1, V)
    logits[0, 2] = float("-inf")
    row = sampler.new_row(SamplingParams(temperature=1.0, seed=1), [1])
    tokens = {sampler.sample(logits, [row]).to_host().tokens[0] for _ in range(100)}
    assert 2 not in tokens and len(tokens) > 10


@pytest.mark.parametrize("temperature", [0.0, 2.0])
def test_logprobs_are_the_models_before_temperature(
    sampler: Sampler, tokenizer: Any, temperature: float
) -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(5)) * 2
    rows = [
        sampler.new_row(SamplingParams(temperature=temperature, seed=3, logprobs=5), [1]),
        sampler.new_row(SamplingParams(temperature=temperature, seed=3, logprobs=0), [1]),
    ]
    host = sampler.sample(logits, rows).to_host()
    expected = torch.log_softmax(logits.double(), dim=-1)
    for i, entry in enumerate(host.logprobs):
        assert entry is not None and entry.token_id == host.tokens[i]
        assert entry.logprob == pytest.approx(float(expected[i, entry.token_id]), abs=1e-5)
        assert entry.token == tokenizer.decode([entry.token_id])
    top = host.logprobs[0].top  # type: ignore[union-attr]
    assert [t for t, _, _ in top] == expected[0].topk(5).indices.tolist()
    assert [lp for _, _, lp in top] == sorted((lp for _, _, lp in top), reverse=True)
    assert sum(math.exp(lp) for _, _, lp in top) <= 1.0
    assert host.logprobs[1].top == ()  # type: ignore[union-attr]


def test_rows_without_logprobs_get_none(sampler: Sampler) -> None:
    rows = [
        sampler.new_row(SamplingParams(), [1]),
        sampler.new_row(SamplingParams(logprobs=1), [1]),
    ]
    host = sampler.sample(torch.randn(2, V), rows).to_host()
    assert host.logprobs[0] is None and host.logprobs[1] is not None


def test_the_callers_logits_are_left_alone_and_half_precision_is_taken(sampler: Sampler) -> None:
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(2))
    logits[:, EOS] = 9.0
    before = logits.clone()
    rows = [sampler.new_row(SamplingParams(ignore_eos=True, presence_penalty=1.0), [1])] * 2
    sampler.sample(logits, rows).to_host()
    assert torch.equal(logits, before)
    greedy = [sampler.new_row(SamplingParams(), [1])] * 2
    half = sampler.sample(logits.bfloat16(), greedy).to_host().tokens
    assert half == logits.bfloat16().float().argmax(-1).tolist()


def test_a_batch_that_does_not_match_its_rows_is_a_bug(sampler: Sampler) -> None:
    with pytest.raises(ValueError):
        sampler.sample(torch.zeros(2, V), [sampler.new_row(SamplingParams(), [1])])


def test_prompt_logprobs_follow_openai_echo(sampler: Sampler, tokenizer: Any) -> None:
    ids = [1, 10, 20, 30, 40]
    logits = torch.randn(len(ids), V, generator=torch.Generator().manual_seed(4))
    entries = prompt_logprobs(logits, ids, 3, sampler.token_text)
    assert [e.token_id for e in entries] == ids
    assert entries[0].logprob is None and entries[0].top == ()
    expected = torch.log_softmax(logits.double(), dim=-1)
    for i in range(1, len(ids)):
        assert entries[i].logprob == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-5)
        assert [t for t, _, _ in entries[i].top] == expected[i - 1].topk(3).indices.tolist()
        assert entries[i].token == tokenizer.decode([ids[i]])
    chunked = prompt_logprobs(logits[:2], ids, 3, sampler.token_text) + prompt_logprobs(
        logits[2:], ids, 3, sampler.token_text, start=2
    )
    assert chunked == entries
    assert sampler.prompt_logprobs(logits[:1], ids[:1], 0) == entries[:1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ("",)}, "stop"),
        ({"temperature": 6.0}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_an_empty_batch(sampler: Sampler) -> None:
    assert sampler.sample(torch.zeros(0, V), []).to_host().tokens == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_on_cuda_synchronises_only_in_to_host(tokenizer: Any) -> None:
    from vajra.policies.decoding import StructuredOutput

    vocab = len(tokenizer)
    sampler = Sampler(
        vocab_size=vocab, device="cuda", eos_token_ids=[EOS], tokenizer=tokenizer, max_rows=8
    )
    cpu = Sampler(
        vocab_size=vocab, device="cpu", eos_token_ids=[EOS], tokenizer=tokenizer, max_rows=8
    )
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.9, seed=1, top_k=20, top_p=0.8, logprobs=3),
        SamplingParams(temperature=1.1, seed=2, top_p=0.7, repetition_penalty=1.2),
        SamplingParams(temperature=0.7, seed=3, min_tokens=4, presence_penalty=0.4),
        SamplingParams(temperature=1.0, seed=4, structured=StructuredOutput("regex", "[a-z ]+")),
    ]
    rows = [sampler.new_row(p, [1, 5, 9]) for p in params]
    cpu_rows = [cpu.new_row(p, [1, 5, 9]) for p in params]
    gen = torch.Generator().manual_seed(0)
    agree = 0
    for _ in range(10):
        logits = torch.randn(len(rows), vocab, generator=gen) * 3
        device_logits = logits.cuda().bfloat16()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = sampler.sample(device_logits, rows)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tokens = result.to_host().tokens
        expected = cpu.sample(logits.bfloat16(), cpu_rows).to_host().tokens
        agree += tokens == expected
        for row, cpu_row, token in zip(rows, cpu_rows, tokens, strict=True):
            row.accept(token)
            cpu_row.accept(token)
    assert agree >= 8  # the same draws up to float rounding
