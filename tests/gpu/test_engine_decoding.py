"""What the engine does with each decoding field, end to end through its steps (tiny model, CPU).

The sampler's arithmetic is tested on its own (test_gpu_sampling*); here the engine wires it:
structured output validates, logprobs and prompt logprobs come out where asked and agree with
the tokens, the stop / min / EOS rules end requests where they should.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import jsonschema
import pytest

from vajra.errors import InvalidRequest
from vajra.gpu.engine import TorchEngine
from vajra.gpu.interface import GenerationRequest, StepOutput
from vajra.policies.decoding import SamplingParams, StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "ok", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> TorchEngine:
    return TorchEngine(tiny_model_dir, device="cpu", max_batch_size=64)


def run(engine: TorchEngine, requests: list[GenerationRequest]) -> dict[str, list[StepOutput]]:
    outputs: dict[str, list[StepOutput]] = defaultdict(list)
    pending = list(requests)
    steps = 0
    while pending or engine.has_work():
        for out in engine.step(pending, []):
            outputs[out.request_id].append(out)
        pending = []
        steps += 1
        assert steps < 2000
    return outputs


def text(outs: list[StepOutput]) -> str:
    return "".join(o.text_delta for o in outs)


def tokens(outs: list[StepOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_fifty_json_schema_requests_all_validate(engine: TorchEngine) -> None:
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    requests = [
        GenerationRequest(
            f"j{i}",
            f"Person number {i}:",
            SamplingParams(max_tokens=96, temperature=1.0, seed=i, structured=structured),
        )
        for i in range(50)
    ]
    outputs = run(engine, requests)
    for i in range(50):
        outs = outputs[f"j{i}"]
        assert outs[-1].finish_reason == "stop", (i, text(outs))
        jsonschema.validate(json.loads(text(outs)), SCHEMA)


def test_json_object_regex_and_lark(engine: TorchEngine) -> None:
    requests = [
        GenerationRequest(
            "obj",
            "JSON:",
            SamplingParams(max_tokens=96, structured=StructuredOutput("json_object")),
        ),
        GenerationRequest(
            "re",
            "Date:",
            SamplingParams(
                max_tokens=32,
                temperature=0.8,
                seed=3,
                structured=StructuredOutput("regex", r"20[0-9]{2}-(0[1-9]|1[0-2])"),
            ),
        ),
        GenerationRequest(
            "lark",
            "Answer:",
            SamplingParams(
                max_tokens=32,
                temperature=0.8,
                seed=4,
                structured=StructuredOutput("lark", 'start: ("yes" | "no") "!"'),
            ),
        ),
    ]
    outputs = run(engine, requests)
    obj = text(outputs["obj"])
    if outputs["obj"][-1].finish_reason == "stop":
        assert isinstance(json.loads(obj), dict)
    else:  # max_tokens cut it short: a prefix of an object, as OpenAI returns it
        assert obj.lstrip().startswith("{")
    date = text(outputs["re"])
    assert len(date) == 7 and date.startswith("20") and date[4] == "-"
    assert text(outputs["lark"]) in ("yes!", "no!")


def test_a_grammar_the_library_refuses_is_a_typed_refusal(engine: TorchEngine) -> None:
    bad = StructuredOutput("lark", "start: undefined_rule")
    (out,) = engine.step([GenerationRequest("bad", "x", SamplingParams(structured=bad))], [])
    assert out.finished and out.finish_reason == "error"
    assert isinstance(out.error, InvalidRequest) and out.error.field == "response_format"
    assert not engine.has_work()


def test_logprobs_follow_the_tokens_and_greedy_takes_the_top(engine: TorchEngine) -> None:
    params = SamplingParams(max_tokens=8, logprobs=3, prompt_logprobs=2)
    outputs = run(engine, [GenerationRequest("lp", "The river town woke", params)])
    outs = outputs["lp"]
    entries = [e for o in outs for e in o.logprobs]
    assert [e.token_id for e in entries] == tokens(outs)
    for e in entries:
        assert e.logprob is not None and e.logprob <= 0.0
        assert len(e.top) == 3
        assert e.top[0][0] == e.token_id and math.isclose(e.top[0][2], e.logprob, abs_tol=1e-5)
        assert [t[2] for t in e.top] == sorted((t[2] for t in e.top), reverse=True)
    prompt = outs[0].prompt_logprobs
    assert prompt is not None and len(prompt) == outs[0].prompt_tokens
    assert prompt[0].logprob is None and all(p.logprob is not None for p in prompt[1:])
    assert all(o.prompt_logprobs is None for o in outs[1:])


def test_prompt_logprobs_are_the_same_when_the_prompt_is_read_in_chunks(
    tiny_model_dir: Path,
) -> None:
    prompt = "The river town woke slowly on the first cold morning of autumn. " * 12
    params = SamplingParams(max_tokens=2, prompt_logprobs=1)
    whole = TorchEngine(tiny_model_dir, device="cpu", max_batch_tokens=4096)
    chunked = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=4, max_batch_tokens=40)
    a = run(whole, [GenerationRequest("a", prompt, params)])["a"][0].prompt_logprobs
    b = run(chunked, [GenerationRequest("a", prompt, params)])["a"][0].prompt_logprobs
    assert a is not None and b is not None and len(a) == len(b) > 100
    for x, y in zip(a, b, strict=True):
        assert x.token_id == y.token_id
        assert (x.logprob is None) == (y.logprob is None)
        if x.logprob is not None and y.logprob is not None:
            assert math.isclose(x.logprob, y.logprob, abs_tol=1e-4)


def test_stop_token_ids_min_tokens_and_ignore_eos(engine: TorchEngine) -> None:
    free = run(engine, [GenerationRequest("free", "Hi", SamplingParams(max_tokens=12))])["free"]
    first_tokens = tokens(free)
    stop_at = first_tokens[3]
    outputs = run(
        engine,
        [
            GenerationRequest(
                "stop", "Hi", SamplingParams(max_tokens=12, stop_token_ids=(stop_at,))
            ),
            GenerationRequest(
                "min",
                "Hi",
                SamplingParams(max_tokens=12, stop_token_ids=(first_tokens[0],), min_tokens=5),
            ),
            GenerationRequest("noeos", "Hi", SamplingParams(max_tokens=40, ignore_eos=True)),
        ],
    )
    stopped = tokens(outputs["stop"])
    assert stopped[-1] == stop_at and outputs["stop"][-1].finish_reason == "stop"
    assert len(stopped) == first_tokens.index(stop_at) + 1
    assert len(tokens(outputs["min"])) >= 5
    assert first_tokens[0] not in tokens(outputs["min"])[:5]
    noeos = outputs["noeos"]
    assert len(tokens(noeos)) == 40 and noeos[-1].finish_reason == "length"
    assert not set(tokens(noeos)) & set(engine._eos)
