"""The official `openai` package, unmodified, against the bridge; and the paper's infer route.

Test rules: loopback only; every client has a timeout and no retries.
"""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture
def oai(base_url: str, tenant: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=tenant[1], timeout=60, max_retries=0)


def test_completion_and_streamed_completion_agree(oai: openai.OpenAI, model_name: str) -> None:
    done = oai.completions.create(
        model=model_name, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert done.object == "text_completion"
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None and done.usage.completion_tokens >= 1
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    chunks = list(
        oai.completions.create(
            model=model_name,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == done.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_chat_and_streamed_chat_agree(oai: openai.OpenAI, model_name: str) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me about the river town."},
    ]
    done = oai.chat.completions.create(
        model=model_name, messages=messages, max_tokens=8, temperature=0, seed=1
    )
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.usage is not None and done.usage.prompt_tokens > 10  # the chat template is applied
    stream = oai.chat.completions.create(
        model=model_name, messages=messages, max_tokens=8, temperature=0, seed=1, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_models_list_the_base_model(oai: openai.OpenAI, model_name: str) -> None:
    ids = [m.id for m in oai.models.list()]
    assert model_name in ids
    assert oai.models.retrieve(model_name).id == model_name


def test_errors_are_openai_shaped(oai: openai.OpenAI, base_url: str, model_name: str) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        oai.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert nf.value.code == "not_found"
    assert isinstance(nf.value.body, dict) and nf.value.body.get("param") == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model=model_name, prompt="hi", max_tokens=100_000)
    assert isinstance(bad.value.body, dict) and bad.value.body.get("param") == "max_tokens"
    with pytest.raises(openai.BadRequestError) as bad_stream:
        oai.chat.completions.create(model=model_name, messages=[], max_tokens=2, stream=True)
    assert (
        isinstance(bad_stream.value.body, dict) and bad_stream.value.body.get("param") == "messages"
    )
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="vk_wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model_name, prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model_name, prompt="hi", max_tokens=2, stream=True)


def test_paper_infer_route_plain_and_streamed(
    base_url: str, tenant: tuple[str, str], model_name: str
) -> None:
    headers = {"Authorization": f"Bearer {tenant[1]}"}
    body = {"prompt": "The river", "parameters": {"temperature": 0, "max_tokens": 6}}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as http:
        r = http.post(f"/v1/models/{model_name}/infer", json=body)
        assert r.status_code == 200, r.text
        plain = r.json()
        assert plain["usage"]["completion_tokens"] >= 1 and plain["usage"]["gpu_ms"] > 0
        with http.stream(
            "POST", f"/v1/models/{model_name}/infer", json={**body, "stream": True}
        ) as s:
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        events = [httpx.Response(200, content=line[6:]).json() for line in lines[:-1]]
        assert "".join(e["text"] for e in events) == plain["text"]
        assert events[-1]["finish_reason"] == plain["finish_reason"]
        r = http.post("/v1/models/not-the-base/infer", json=body)
        assert r.status_code == 404 and r.json()["error"]["field"] == "model_id"
        r = http.post(f"/v1/models/{model_name}/infer", json={"prompt": ""})
        assert r.status_code == 400 and r.json()["error"]["field"] == "prompt"
        r = http.post(
            f"/v1/models/{model_name}/infer",
            json={"prompt": "hi", "parameters": {"max_tokens": 1000}},
        )
        assert r.status_code == 400 and r.json()["error"] == {
            "code": "invalid_request",
            "message": r.json()["error"]["message"],
            "field": "max_tokens",
        }
        r = http.post(f"/v1/models/{model_name}/infer", content=b"x" * 70_000)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        r = http.post(f"/v1/models/{model_name}/infer", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "rank": {"type": "integer", "minimum": 1, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["city", "rank", "ok"],
    "additionalProperties": False,
}


def test_real_engine_json_schema_logprobs_and_n_through_the_client(
    oai: openai.OpenAI, model_name: str
) -> None:
    """The tiny model behind the bridge, not the null engine: the grammar holds its random
    output to the schema, logprobs come back per token, and n > 1 gives that many choices."""
    import json

    import jsonschema

    done = oai.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "Give me a city as JSON."}],
        max_tokens=60,  # the test cluster's limit is 64
        temperature=1.0,
        seed=5,
        n=3,
        logprobs=True,
        top_logprobs=2,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
        },
    )
    assert [c.index for c in done.choices] == [0, 1, 2]
    for choice in done.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
        assert choice.logprobs is not None and choice.logprobs.content
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 2
    assert done.usage is not None and done.usage.completion_tokens >= 3
    echoed = oai.completions.create(
        model=model_name,
        prompt="The river town",
        max_tokens=3,
        temperature=0,
        echo=True,
        logprobs=1,
    )
    lp = echoed.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    assert echoed.choices[0].text.startswith("The river town")
    assert lp.token_logprobs[0] is None and len(lp.tokens) > 3
