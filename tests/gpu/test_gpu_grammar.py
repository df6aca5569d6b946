"""Structured output: random logits through the grammar mask always give valid output.

Rules: the tiny model's byte-level BPE tokenizer; logits are random (a fixed seed per case), so
only the grammar keeps the text valid; every loop is capped well below its schema's longest
output, and must terminate by the grammar, not the cap.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from vajra.errors import InvalidRequest
from vajra.gpu.grammar import GrammarLimits, Grammars
from vajra.gpu.sampling import BAD_ROW, RowSampler, Sampler
from vajra.policies.decoding import SamplingParams, StructuredOutput

CAP = 160  # tokens a sampling loop may take

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Thousands of tiny sampling steps: on a busy CPU, torch's thread pool only adds waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sampler(tokenizer: Any) -> Sampler:
    vocab = len(tokenizer)
    return Sampler(
        vocab_size=vocab,
        device="cpu",
        eos_token_ids=[tokenizer.eos_token_id],
        tokenizer=tokenizer,
        max_rows=8,
    )


def generate(sampler: Sampler, rows: list[RowSampler], seed: int) -> list[list[int]]:
    """Sample every row until its grammar terminates or it draws EOS; random logits."""
    gen = torch.Generator().manual_seed(seed)
    eos = sampler.grammars._eos
    out: list[list[int]] = [[] for _ in rows]
    live = list(range(len(rows)))
    for _ in range(CAP):
        if not live:
            return out
        logits = torch.randn(len(live), sampler.vocab_size, generator=gen) * 3
        tokens = sampler.sample(logits, [rows[i] for i in live]).to_host().tokens
        still = []
        for i, token in zip(live, tokens, strict=True):
            assert token != BAD_ROW, rows[i].error
            done = rows[i].accept(token)
            if token in eos:
                continue
            out[i].append(token)
            if not done:
                still.append(i)
        live = still
    raise AssertionError(f"rows {live} did not finish in {CAP} tokens")


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_fifty_schema_constrained_samplings_are_valid_json(
    sampler: Sampler, tokenizer: Any, temperature: float
) -> None:
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    texts = []
    for batch in range(10):
        rows = [
            sampler.new_row(
                SamplingParams(temperature=temperature, seed=batch * 5 + i, structured=spec), [1]
            )
            for i in range(5)
        ]
        for ids in generate(sampler, rows, seed=batch):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            jsonschema.validate(json.loads(text), SCHEMA)
            assert not any(c in text for c in "\n\r\t"), text  # one line, json.dumps's layout
            texts.append(text)
    assert len(texts) == 50
    assert len(set(texts)) > (25 if temperature else 1)


def test_regex_and_lark_outputs_match(sampler: Sampler, tokenizer: Any) -> None:
    cases = [
        (
            StructuredOutput("regex", r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"),
            r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)",
        ),
        (
            StructuredOutput(
                "lark",
                'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]{1,3}/',
            ),
            r"yes|no|maybe [0-9]{1,3}",
        ),
    ]
    for structured, pattern in cases:
        rows = [
            sampler.new_row(SamplingParams(temperature=1.0, seed=i, structured=structured), [1])
            for i in range(8)
        ]
        for ids in generate(sampler, rows, seed=7):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            assert re.fullmatch(pattern, text), text


def test_json_object_takes_any_object_and_masks_the_rest(sampler: Sampler, tokenizer: Any) -> None:
    row = sampler.new_row(SamplingParams(structured=StructuredOutput("json_object")), [1])
    ids = tokenizer('{"k": [1, {"x": null}], "s": "é"}', add_special_tokens=False).input_ids
    for token in ids[:-1]:
        logits = torch.zeros(1, sampler.vocab_size)
        logits[0, token] = 1.0  # greedy picks the scripted token: the mask allows it
        assert sampler.sample(logits, [row]).to_host().tokens == [token]
        assert not row.accept(token)
    assert row.accept(ids[-1])  # the object is closed: nothing may follow
    fresh = sampler.new_row(SamplingParams(structured=StructuredOutput("json_object")), [1])
    logits = torch.zeros(1, sampler.vocab_size)
    logits[0, tokenizer("hello", add_special_tokens=False).input_ids[0]] = 50.0
    first = sampler.sample(logits, [fresh]).to_host().tokens[0]
    assert tokenizer.decode([first]).startswith("{")


def test_logprobs_of_a_grammar_row_are_the_models(sampler: Sampler) -> None:
    structured = StructuredOutput("regex", "z+")
    row = sampler.new_row(SamplingParams(logprobs=1, structured=structured), [1])
    logits = torch.randn(1, sampler.vocab_size, generator=torch.Generator().manual_seed(1))
    entry = sampler.sample(logits, [row]).to_host().logprobs[0]
    assert entry is not None and sampler.token_text(entry.token_id).startswith("z")
    expected = torch.log_softmax(logits[0].double(), 0)
    assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-5)
    assert entry.top[0][0] == int(logits.argmax())  # unmasked: what the model says


def test_a_failed_matcher_gets_bad_row_and_says_why(sampler: Sampler, tokenizer: Any) -> None:
    row = sampler.new_row(SamplingParams(structured=StructuredOutput("regex", "[0-9]+")), [1])
    assert row.accept(tokenizer("abc", add_special_tokens=False).input_ids[0])  # forbidden
    assert row.error
    other = sampler.new_row(SamplingParams(), [1])
    logits = torch.randn(2, sampler.vocab_size)
    assert sampler.sample(logits, [row, other]).to_host().tokens == [
        BAD_ROW,
        int(logits[1].argmax()),
    ]


@pytest.mark.parametrize(
    ("kind", "spec"),
    [
        ("regex", "a(b"),
        ("lark", "start: foo"),
        ("json_schema", '{"type": "strin"}'),
        ("json_schema", '{"type": "string", "format": "no-such-format"}'),
    ],
)
def test_a_grammar_llguidance_refuses_is_an_invalid_request(
    sampler: Sampler, kind: str, spec: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        sampler.new_row(SamplingParams(structured=StructuredOutput(kind, spec)), [1])  # type: ignore[arg-type]
    assert caught.value.field == "response_format"
    assert str(caught.value).strip()


def test_limits_refuse_a_grammar_too_large(tokenizer: Any) -> None:
    grammars = Grammars(tokenizer, len(tokenizer), [2], GrammarLimits(max_grammar_size=50))
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(40)}}
    with pytest.raises(InvalidRequest, match="structured output"):
        grammars.matcher(StructuredOutput("json_schema", json.dumps(wide)))


def test_compiled_grammars_are_cached_in_a_bounded_lru(tokenizer: Any) -> None:
    grammars = Grammars(tokenizer, len(tokenizer), [2], GrammarLimits(cache_size=2))
    specs = [StructuredOutput("regex", f"a{{{n}}}") for n in (1, 2, 3)]
    first = grammars.matcher(specs[0])
    assert grammars.matcher(specs[0]) is not first  # a fresh copy each time
    for spec in specs:
        grammars.matcher(spec)
    assert list(grammars._compiled) == [("regex", "a{2}"), ("regex", "a{3}")]


def test_a_model_vocabulary_wider_than_the_tokenizer(tokenizer: Any) -> None:
    wide = Sampler(
        vocab_size=len(tokenizer) + 40,
        device="cpu",
        eos_token_ids=[2],
        tokenizer=tokenizer,
        max_rows=2,
    )
    row = wide.new_row(SamplingParams(structured=StructuredOutput("regex", "ab")), [1])
    logits = torch.zeros(1, wide.vocab_size)
    logits[0, -1] = 100.0  # a padding row of the model: never allowed by a grammar
    token = wide.sample(logits, [row]).to_host().tokens[0]
    assert 0 <= token < len(tokenizer)
