"""The null engine honours the decoding fields it can without a model, exactly as documented,
and fabricates deterministic log-probabilities (the wire and HTTP tests rely on both)."""

from __future__ import annotations

import pytest

from vajra.errors import InvalidRequest
from vajra.gpu.interface import GenerationRequest, StepOutput
from vajra.gpu.null_engine import NullEngine, prompt_logprob, reply_logprob
from vajra.policies.decoding import SamplingParams, StructuredOutput


def _run(engine: NullEngine, *requests: GenerationRequest) -> dict[str, list[StepOutput]]:
    """Step until every request finished; the outputs of each, in order."""
    outs: dict[str, list[StepOutput]] = {r.request_id: [] for r in requests}
    admit = list(requests)
    for _ in range(100):
        for out in engine.step(admit, []):
            outs[out.request_id].append(out)
        admit = []
        if not engine.has_work():
            return outs
    raise AssertionError("the null engine never finished")


def _req(rid: str, prompt: str = "hi", **params: object) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(**params))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("params", "tokens", "reason"),
    [
        ({}, 1, "stop"),
        ({"max_tokens": 1}, 1, "length"),
        ({"min_tokens": 3, "max_tokens": 8}, 3, "stop"),
        ({"ignore_eos": True, "max_tokens": 5}, 5, "length"),
        ({"ignore_eos": True, "max_tokens": 5, "stop_token_ids": (0,)}, 1, "stop"),
        ({"ignore_eos": True, "max_tokens": 5, "stop_token_ids": (0,), "min_tokens": 2}, 2, "stop"),
        ({"min_tokens": 4, "max_tokens": 4}, 4, "length"),
    ],
)
def test_lengths_follow_max_min_tokens_eos_and_stop_token_ids(
    params: dict[str, object], tokens: int, reason: str
) -> None:
    outs = _run(NullEngine(), _req("a", **params))["a"]
    assert len(outs) == tokens  # one token per step
    assert [o.completion_tokens for o in outs] == list(range(1, tokens + 1))
    assert all(o.text_delta == "." and o.token_ids == (0,) for o in outs)
    assert [o.finished for o in outs] == [False] * (tokens - 1) + [True]
    assert outs[-1].finish_reason == reason


def test_logprobs_are_fabricated_per_token_and_prompt_logprobs_once() -> None:
    outs = _run(NullEngine(), _req("a", "ab", max_tokens=3, ignore_eos=True, logprobs=2))["a"]
    assert [o.logprobs for o in outs] == [(reply_logprob(i, 2),) for i in range(3)]
    assert outs[0].logprobs[0].top == ((0, ".", -0.25), (98, "a", -1.25))
    assert all(o.prompt_logprobs is None for o in outs)

    outs = _run(NullEngine(), _req("b", "ab", max_tokens=2, ignore_eos=True, prompt_logprobs=1))[
        "b"
    ]
    assert outs[0].prompt_logprobs == (prompt_logprob(98, 0, 1), prompt_logprob(99, 1, 1))
    assert outs[0].prompt_logprobs[0].logprob is None  # nothing precedes the first token
    assert outs[1].prompt_logprobs is None and outs[1].logprobs == ()


def test_a_regex_that_does_not_compile_is_refused_naming_response_format() -> None:
    engine = NullEngine()
    bad = GenerationRequest("x", "hi", SamplingParams(structured=StructuredOutput("regex", "(")))
    (out,) = engine.step([bad], [])
    assert out.finished and out.finish_reason == "error"
    assert isinstance(out.error, InvalidRequest) and out.error.field == "response_format"
    ok = GenerationRequest("y", "hi", SamplingParams(structured=StructuredOutput("regex", "a+")))
    assert engine.step([ok], [])[0].error is None
    assert [r.request_id for r in engine.admitted] == ["x", "y"]


def test_an_aborted_request_ends_with_abort_and_its_count() -> None:
    engine = NullEngine()
    engine.step([_req("a", max_tokens=10, ignore_eos=True)], [])
    assert engine.num_running() == 1
    (out,) = engine.step([], ["a", "unknown"])
    assert (out.finished, out.finish_reason, out.completion_tokens) == (True, "abort", 1)
    assert not engine.has_work()
