"""Every decoding field through the SDK, sync and async: from the call's keywords (or a
SamplingParams) to the engine, and log-probabilities and ``n`` choices back.

Against the session's null cluster (tests/null_cluster.py): the null engine records what it
admitted and fabricates deterministic log-probabilities.

Test rules: loopback only; every call has a timeout; Trio tests under ``fail_after``.
"""

from __future__ import annotations

import json

import pytest
import trio

from tests.null_cluster import NullCluster
from vajra.bus.messages import InferRequest, Sampling
from vajra.client import (
    AsyncClient,
    Client,
    FanoutStream,
    InvalidRequest,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
    Usage,
)
from vajra.client._choices import fan_out, gather, merge
from vajra.client._decoding import sampling_params, structured_output
from vajra.client._types import InferenceResult, StreamChunk
from vajra.gpu.null_engine import prompt_logprob, reply_logprob

TIMEOUT_S = 20.0

#: Every field of SamplingParams set away from its default.
EVERY_FIELD = SamplingParams(
    max_tokens=6,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    stop=("\n\n",),
    seed=11,
    stop_token_ids=(7, 8),
    min_tokens=2,
    presence_penalty=0.5,
    frequency_penalty=-0.25,
    repetition_penalty=1.3,
    ignore_eos=True,
    logprobs=3,
    prompt_logprobs=1,
    structured=StructuredOutput("json_schema", '{"type":"object"}'),
)


def _wire(lp: object) -> TokenLogprob:
    """The null engine's entry as the SDK hands it back."""
    return TokenLogprob(lp.token_id, lp.token, lp.logprob, lp.top)  # type: ignore[attr-defined]


# --- pure: keywords, response_format, fan-out ----------------------------------------------


def test_keywords_override_params_and_build_one_sampling_params() -> None:
    base = SamplingParams(max_tokens=9, temperature=0.5, seed=1)
    got = sampling_params(base, {"seed": None, "stop": "x", "stop_token_ids": [3]})
    assert got == SamplingParams(max_tokens=9, temperature=0.5, stop=("x",), stop_token_ids=(3,))
    assert sampling_params(None, {}) == SamplingParams()
    assert sampling_params(base, {}) is base
    fmt = {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}}
    assert sampling_params(None, {"response_format": fmt}).structured == StructuredOutput(
        "json_schema", '{"type":"object"}'
    )
    with pytest.raises(InvalidRequest) as info:
        sampling_params(None, {"response_format": {"type": "json_object"}, "structured": fmt})
    assert info.value.field == "response_format"


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, StructuredOutput("json_object")),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, StructuredOutput("json_object")),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"a": [1, 2]}}},
            StructuredOutput("json_schema", '{"a":[1,2]}'),
        ),
    ],
)
def test_response_format_as_structured_output(
    response_format: object, expected: StructuredOutput | None
) -> None:
    assert structured_output(response_format) == expected


def test_fan_out_derives_ids_and_seeds_and_merge_counts_the_prompt_once() -> None:
    request = InferRequest("abc", "k", "p", sampling=Sampling(seed=2**63 - 2))
    requests = fan_out(request, 3)
    assert [r.request_id for r in requests] == ["abc-0", "abc-1", "abc-2"]
    assert [r.sampling.seed for r in requests] == [2**63 - 2, 2**63 - 1, 0]
    assert fan_out(request, 1) == [request]
    unseeded = fan_out(InferRequest("abc", "k", "p"), 2)
    assert [r.sampling.seed for r in unseeded] == [None, None]

    def result(i: int, tokens: int) -> InferenceResult:
        usage = Usage(4, tokens, 4 + tokens, gpu_ms=1.0, queue_ms=float(i))
        return InferenceResult(f"abc-{i}", "x" * tokens, [0] * tokens, "stop", usage, "e")

    merged = merge([result(0, 2), result(1, 3)], "abc")
    assert merged.usage == Usage(4, 5, 9, gpu_ms=2.0)
    assert merged.usage.queue_ms == 1.0
    assert [(c.index, c.request_id, c.text) for c in merged.choices] == [
        (0, "abc-0", "xx"),
        (1, "abc-1", "xxx"),
    ]
    assert merged.text == "xx" and merged.request_id == "abc"
    single = result(0, 1)
    assert single.choices[0].text == single.text and len(single.choices) == 1


def test_gather_assembles_a_streamed_result() -> None:
    lp = [TokenLogprob(0, ".", -0.5), TokenLogprob(0, ".", -1.0)]
    chunks = [
        StreamChunk("r", 0, "a", [1], logprobs=lp[:1], prompt_logprobs=[lp[1]]),
        StreamChunk("r", 1, "b", [2], logprobs=lp[1:]),
        StreamChunk("r", 2, "", [], "length", Usage(1, 2, 3, 0.0), executor_id="e"),
    ]
    r = gather(chunks)
    assert (r.text, r.tokens, r.finish_reason, r.executor_id) == ("ab", [1, 2], "length", "e")
    assert r.logprobs == lp and r.prompt_logprobs == [lp[1]]


# --- the null cluster: what reaches the engine, and what comes back -------------------------


def test_every_field_reaches_the_engine_as_given(null_cluster_running: NullCluster) -> None:
    c = null_cluster_running
    with Client(c.gateway, c.api_key, timeout_s=TIMEOUT_S) as client:
        client.infer("every field by params", params=EVERY_FIELD)
        fmt = {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}}
        client.infer(
            "every field by keyword",
            max_tokens=6,
            temperature=0.7,
            top_p=0.9,
            top_k=40,
            stop="\n\n",
            seed=11,
            stop_token_ids=[7, 8],
            min_tokens=2,
            presence_penalty=0.5,
            frequency_penalty=-0.25,
            repetition_penalty=1.3,
            ignore_eos=True,
            logprobs=3,
            prompt_logprobs=1,
            response_format=fmt,
        )
    (by_params,) = c.admitted("every field by params")
    (by_keyword,) = c.admitted("every field by keyword")
    assert by_params.params == EVERY_FIELD
    assert by_keyword.params == EVERY_FIELD


def test_logprobs_come_back_on_results_and_stream_chunks(null_cluster_running: NullCluster) -> None:
    c = null_cluster_running
    params = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2, prompt_logprobs=0)
    with Client(c.gateway, c.api_key, timeout_s=TIMEOUT_S) as client:
        r = client.infer("ab", params=params)
        chunks = list(client.stream("ab", params=params))
    expected = [_wire(reply_logprob(i, 2)) for i in range(3)]
    prompt = [_wire(prompt_logprob(98, 0, 0)), _wire(prompt_logprob(99, 1, 0))]
    assert (r.text, r.finish_reason) == ("...", "length")
    assert r.logprobs == expected and r.prompt_logprobs == prompt
    assert r.choices[0].logprobs == expected and r.executor_id == "exec-0"
    assert [lp for ch in chunks for lp in ch.logprobs] == expected
    assert all(len(ch.logprobs) == len(ch.token_ids) for ch in chunks[:-1])
    assert chunks[0].prompt_logprobs == prompt
    assert all(ch.prompt_logprobs is None for ch in chunks[1:])
    assert chunks[-1].is_final and chunks[-1].logprobs == []


def test_n_choices_are_sent_together_with_derived_ids_and_seeds(
    null_cluster_running: NullCluster,
) -> None:
    c = null_cluster_running
    with Client(c.gateway, c.api_key, timeout_s=TIMEOUT_S) as client:
        r = client.infer("three choices", n=3, seed=40, max_tokens=2, ignore_eos=True)
        lp = client.infer("two with logprobs", n=2, max_tokens=2, ignore_eos=True, logprobs=0)
        streamed = list(client.stream("streamed pair", n=2, max_tokens=3, ignore_eos=True))
    admitted = c.admitted("three choices")
    assert sorted(a.params.seed for a in admitted) == [40, 41, 42]  # type: ignore[type-var]
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.request_id for ch in r.choices] == [f"{r.request_id}-{i}" for i in range(3)]
    assert all(ch.text == ".." and ch.finish_reason == "length" for ch in r.choices)
    assert r.usage.prompt_tokens == len("three choices")  # counted once
    assert r.usage.completion_tokens == 6
    assert [len(ch.logprobs) for ch in lp.choices] == [2, 2]
    assert {ch.choice for ch in streamed} == {0, 1}
    for i in (0, 1):
        mine = [ch for ch in streamed if ch.choice == i]
        assert "".join(ch.text for ch in mine) == "..."
        assert [ch.is_final for ch in mine] == [False] * (len(mine) - 1) + [True]


def test_a_bad_grammar_is_refused_by_the_engine_naming_response_format(
    null_cluster_running: NullCluster,
) -> None:
    c = null_cluster_running
    with Client(c.gateway, c.api_key, timeout_s=TIMEOUT_S) as client:
        for call in (client.infer, lambda *a, **k: list(client.stream(*a, **k))):
            with pytest.raises(InvalidRequest) as info:
                call("bad regex", structured=StructuredOutput("regex", "(unclosed"))
            assert info.value.field == "response_format"
        assert client.infer("still serving").text == "."


async def test_the_trio_client_does_the_same(null_cluster_running: NullCluster) -> None:
    c = null_cluster_running
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    with trio.fail_after(TIMEOUT_S):
        async with AsyncClient(c.gateway, c.api_key, timeout_s=TIMEOUT_S) as client:
            r = await client.infer(
                "async every field", params=EVERY_FIELD, n=2, max_tokens=3, logprobs=1
            )
            stream = client.stream(
                "async stream",
                n=2,
                max_tokens=2,
                ignore_eos=True,
                logprobs=0,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema},
                },
            )
            assert isinstance(stream, FanoutStream)
            async with stream as chunks:
                got = [ch async for ch in chunks]
            async with client.stream("async early exit", n=3, max_tokens=50, ignore_eos=True) as s:
                async for _ in s:
                    break  # leaving early abandons every choice
            assert client.cancels_sent == 3
            with pytest.raises(InvalidRequest) as info:
                await client.infer(
                    "async bad regex", n=2, structured=StructuredOutput("regex", "(")
                )
            assert info.value.field == "response_format"
    assert [ch.index for ch in r.choices] == [0, 1]
    assert all(len(ch.logprobs) == 3 for ch in r.choices)
    assert r.prompt_logprobs is not None and len(r.prompt_logprobs) == len("async every field")
    assert sorted(a.params.seed for a in c.admitted("async every field")) == [11, 12]  # type: ignore[type-var]
    admitted = c.admitted("async stream")
    assert len(admitted) == 2
    assert admitted[0].params.structured == StructuredOutput(
        "json_schema", json.dumps(schema, separators=(",", ":"))
    )
    assert sorted(ch.choice for ch in got if ch.is_final) == [0, 1]
    assert all(len(ch.logprobs) == 1 for ch in got if not ch.is_final)
