"""Every decoding field on the OpenAI routes (with the official `openai` package, unmodified)
and on the paper's route: what reaches the engine, log-probabilities in each route's format,
``n`` choices, streaming, and typed 400s naming the field.

Against the session's null cluster (tests/null_cluster.py), whose engine records what it
admitted and fabricates deterministic log-probabilities: reply token ``k`` (0-based) has
logprob ``-0.25 * (k + 1)`` and alternatives ``a``, ``b``, ... one nat apart; prompt byte
``b`` is token ``b + 1``.

Test rules: loopback only; every client has a timeout and no retries.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.null_cluster import MODEL, NullCluster
from vajra.http._chat import ChatTemplate
from vajra.policies.decoding import SamplingParams, StructuredOutput

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.fixture
def oai(null_cluster_running: NullCluster) -> openai.OpenAI:
    c = null_cluster_running
    return openai.OpenAI(base_url=f"{c.http}/v1", api_key=c.api_key, timeout=30, max_retries=0)


def _chat_prompt(content: str) -> str:
    return ChatTemplate(None).render([{"role": "user", "content": content}])


def _reply_lp(k: int) -> float:
    return -0.25 * (k + 1)


# --- /v1/completions -----------------------------------------------------------------------


def test_completion_logprobs_echo_and_n(
    oai: openai.OpenAI, null_cluster_running: NullCluster
) -> None:
    r = oai.completions.create(
        model=MODEL,
        prompt="ab",
        max_tokens=3,
        logprobs=2,
        echo=True,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.text == "ab..." and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp is not None
        assert lp.tokens == ["a", "b", ".", ".", "."]
        assert lp.text_offset == [0, 1, 2, 3, 4]
        assert lp.token_logprobs == [None, -1.9, -0.25, -0.5, -0.75]
        assert lp.top_logprobs is not None
        assert lp.top_logprobs[0] is None
        assert lp.top_logprobs[1] == {"b": -1.9, "a": -2.9}  # prompt: the token, then "a"
        assert lp.top_logprobs[2] == {".": -0.25, "a": -1.25}
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 6)  # the prompt once
    (params,) = {a.params for a in null_cluster_running.admitted("ab")[-2:]}  # the n=2 requests
    assert (params.logprobs, params.prompt_logprobs, params.temperature) == (2, 2, 1.0)


def test_streamed_completion_with_logprobs_and_n(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.completions.create(
            model=MODEL,
            prompt="stream me",
            max_tokens=3,
            logprobs=1,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    by_index: dict[int, list[Any]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        by_index[choice.index].append(choice)
    for choices in by_index.values():
        assert "".join(c.text for c in choices) == "..."
        assert choices[-1].finish_reason == "length"
        tokens = [t for c in choices if c.logprobs for t in c.logprobs.tokens or []]
        offsets = [o for c in choices if c.logprobs for o in c.logprobs.text_offset or []]
        values = [v for c in choices if c.logprobs for v in c.logprobs.token_logprobs or []]
        assert (tokens, offsets, values) == (["."] * 3, [0, 1, 2], [-0.25, -0.5, -0.75])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (len("stream me"), 6)


def test_streamed_echo_sends_the_prompt_and_its_logprobs_first(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.completions.create(
            model=MODEL,
            prompt="cd",
            max_tokens=2,
            logprobs=0,
            echo=True,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].text.startswith("cd")
    assert "".join(ch.choices[0].text for ch in chunks) == "cd.."
    lps = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
    tokens = [t for lp in lps for t in lp.tokens or []]
    values = [v for lp in lps for v in lp.token_logprobs or []]
    offsets = [o for lp in lps for o in lp.text_offset or []]
    assert (tokens, offsets) == (["c", "d", ".", "."], [0, 1, 2, 3])
    assert values == [None, -1.1, -0.25, -0.5]  # "d" is token 101


def test_every_extension_field_reaches_the_engine(
    oai: openai.OpenAI, null_cluster_running: NullCluster
) -> None:
    extra = {
        "top_k": 7,
        "min_tokens": 2,
        "stop_token_ids": [5, 6],
        "repetition_penalty": 1.1,
        "ignore_eos": True,
        "guided_regex": "[a-z]+",
    }
    oai.completions.create(
        model=MODEL,
        prompt="extensions",
        max_tokens=4,
        temperature=0.5,
        top_p=0.8,
        stop=["zz"],
        seed=9,
        presence_penalty=0.3,
        frequency_penalty=-0.3,
        extra_body=extra,
    )
    (req,) = null_cluster_running.admitted("extensions")
    assert req.params == SamplingParams(
        max_tokens=4,
        temperature=0.5,
        top_p=0.8,
        top_k=7,
        stop=("zz",),
        seed=9,
        stop_token_ids=(5, 6),
        min_tokens=2,
        presence_penalty=0.3,
        frequency_penalty=-0.3,
        repetition_penalty=1.1,
        ignore_eos=True,
        structured=StructuredOutput("regex", "[a-z]+"),
    )
    oai.completions.create(
        model=MODEL, prompt="lark", max_tokens=2, extra_body={"guided_grammar": 'start: "x"'}
    )
    oai.completions.create(
        model=MODEL, prompt="guided json", max_tokens=2, extra_body={"guided_json": SCHEMA}
    )
    oai.completions.create(model=MODEL, prompt="top k -1", max_tokens=2, extra_body={"top_k": -1})
    admitted = null_cluster_running.admitted
    assert admitted("lark")[0].params.structured == StructuredOutput("lark", 'start: "x"')
    structured = admitted("guided json")[0].params.structured
    assert structured is not None and json.loads(structured.spec) == SCHEMA
    assert admitted("top k -1")[0].params.top_k == 0


# --- /v1/chat/completions ------------------------------------------------------------------


def test_chat_logprobs_n_and_json_schema(
    oai: openai.OpenAI, null_cluster_running: NullCluster
) -> None:
    r = oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "where?"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=2,
        n=2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "place", "schema": SCHEMA, "strict": True},
        },
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.message.content == ".."
        assert choice.logprobs is not None and choice.logprobs.content is not None
        entries = choice.logprobs.content
        assert [(e.token, e.logprob, e.bytes) for e in entries] == [
            (".", -0.25, [46]),
            (".", -0.5, [46]),
        ]
        assert [(t.token, t.logprob) for t in entries[0].top_logprobs] == [
            (".", -0.25),
            ("a", -1.25),
        ]
    (params,) = {a.params for a in null_cluster_running.admitted(_chat_prompt("where?"))}
    assert params.logprobs == 2 and params.structured is not None
    assert params.structured.kind == "json_schema"
    assert json.loads(params.structured.spec) == SCHEMA
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(_chat_prompt("where?").encode())  # once, for n=2
    assert r.usage.completion_tokens == 4


def test_streamed_chat_with_logprobs_and_n(oai: openai.OpenAI) -> None:
    chunks = list(
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "stream chat"}],
            max_tokens=3,
            logprobs=True,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    for index in (0, 1):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == "..."
        assert mine[-1].finish_reason == "length"
        values = [
            e.logprob for c in mine if c.logprobs and c.logprobs.content for e in c.logprobs.content
        ]
        assert values == [-0.25, -0.5, -0.75]
        assert all(c.logprobs is None or c.logprobs.content for c in mine)
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 6
    assert usage.prompt_tokens == len(_chat_prompt("stream chat").encode())


def test_chat_json_object_and_text_formats(
    oai: openai.OpenAI, null_cluster_running: NullCluster
) -> None:
    for fmt, expected in (
        ({"type": "json_object"}, StructuredOutput("json_object")),
        ({"type": "text"}, None),
    ):
        content = f"format {fmt['type']}"
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": content}],
            max_tokens=2,
            response_format=fmt,  # type: ignore[arg-type]
        )
        (req,) = null_cluster_running.admitted(_chat_prompt(content))
        assert req.params.structured == expected


# --- typed errors --------------------------------------------------------------------------


def _param_of(exc: openai.BadRequestError) -> object:
    assert isinstance(exc.body, dict)
    return exc.body.get("param")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logprobs": 21}, "logprobs"),
        ({"n": 17}, "n"),
        ({"n": 0}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"extra_body": {"min_tokens": 9}}, "min_tokens"),  # more than max_tokens
        ({"extra_body": {"top_k": -2}}, "top_k"),
        ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ({"extra_body": {"stop_token_ids": [-1]}}, "stop_token_ids.0"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),  # the engine's refusal
        ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
        ({"extra_body": {"guided_regex": "a", "guided_grammar": "b"}}, "guided_grammar"),
        ({"extra_body": {"response_format": {"type": "json_schema"}}}, "response_format"),
        ({"extra_body": {"response_format": {"type": "yaml"}}}, "response_format.type"),
    ],
)
def test_bad_completion_values_are_400_naming_the_field(
    oai: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL, prompt="bad", max_tokens=4, **kwargs)
    assert _param_of(info.value) == param


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"n": 17}, "n"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
            "response_format.json_schema.schema",
        ),
        (
            {"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}},
            "guided_regex",
        ),
    ],
)
def test_bad_chat_values_are_400_naming_the_field(
    oai: openai.OpenAI, kwargs: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "bad"}], max_tokens=4, **kwargs
        )
    assert _param_of(info.value) == param
    with pytest.raises(openai.BadRequestError) as info:  # streams are refused the same way
        oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "bad"}],
            max_tokens=4,
            stream=True,
            **kwargs,
        )
    assert _param_of(info.value) == param


# --- the paper API -------------------------------------------------------------------------


def _infer(c: NullCluster, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        f"{c.http}/v1/models/{MODEL}/infer",
        json=body,
        headers={"Authorization": f"Bearer {c.api_key}"},
        timeout=30,
    )


def test_paper_api_takes_every_field_and_answers_logprobs_and_choices(
    null_cluster_running: NullCluster,
) -> None:
    c = null_cluster_running
    parameters = {
        "max_tokens": 2,
        "temperature": 0.2,
        "top_k": 3,
        "min_tokens": 1,
        "stop_token_ids": [4],
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "repetition_penalty": 1.05,
        "ignore_eos": True,
        "logprobs": 1,
        "prompt_logprobs": 0,
        "seed": 3,
        "n": 2,
        "guided_json": SCHEMA,
    }
    r = _infer(c, {"prompt": "xy", "parameters": parameters})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == ".." and [ch["index"] for ch in body["choices"]] == [0, 1]
    assert body["logprobs"] == body["choices"][0]["logprobs"]
    assert body["logprobs"][1] == {
        "token_id": 0,
        "token": ".",
        "logprob": -0.5,
        "top": [{"token_id": 0, "token": ".", "logprob": -0.5}],
    }
    assert [e["logprob"] for e in body["prompt_logprobs"]] == [None, -1.2]  # "y": token 122
    assert body["usage"]["prompt_tokens"] == 2 and body["usage"]["completion_tokens"] == 4
    admitted = c.admitted("xy")
    assert sorted(a.params.seed for a in admitted) == [3, 4]  # type: ignore[type-var]
    p = admitted[0].params
    assert (p.top_k, p.min_tokens, p.stop_token_ids, p.repetition_penalty) == (3, 1, (4,), 1.05)
    assert (p.presence_penalty, p.frequency_penalty, p.ignore_eos) == (0.1, 0.2, True)
    assert p.structured is not None and json.loads(p.structured.spec) == SCHEMA

    with httpx.stream(
        "POST",
        f"{c.http}/v1/models/{MODEL}/infer",
        json={"prompt": "xy", "stream": True, "parameters": parameters},
        headers={"Authorization": f"Bearer {c.api_key}"},
        timeout=30,
    ) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    for choice in (0, 1):
        mine = [e for e in events if e["choice"] == choice]
        assert "".join(e["text"] for e in mine) == ".."
        assert [lp["logprob"] for e in mine for lp in e["logprobs"]] == [-0.25, -0.5]
        assert mine[0]["prompt_logprobs"][1]["token"] == "y"
        assert mine[-1]["finish_reason"] == "length" and mine[-1]["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"logprobs": 21}, "parameters.logprobs"),
        ({"n": 17}, "parameters.n"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"guided_regex": "("}, "guided_regex"),
    ],
)
def test_paper_api_bad_values_are_400_naming_the_field(
    null_cluster_running: NullCluster, parameters: dict[str, Any], field: str
) -> None:
    r = _infer(null_cluster_running, {"prompt": "bad", "parameters": parameters})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field
