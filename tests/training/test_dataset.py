"""Training datasets are refused before any GPU work, with the line and field named."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vajra.errors import InvalidRequest
from vajra.training import Example, InvalidDataset, dataset_digest, parse_dataset


def parse(data: bytes, max_bytes: int = 1 << 20, max_examples: int = 100) -> list[Example]:
    return parse_dataset(data, max_bytes=max_bytes, max_examples=max_examples)


def test_three_shapes_and_blank_lines() -> None:
    data = (
        b'\xef\xbb\xbf{"prompt": "Q", "completion": " A"}\n\n'
        b'{"text": "free text"}\r\n'
        b'{"messages": [{"role": "system", "content": "be brief"}, '
        b'{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'
    )
    got = parse(data)
    assert [e.kind for e in got] == ["prompt_completion", "text", "chat"]
    assert got[0] == Example(prompt="Q", completion=" A", line=1)
    assert got[1].text == "free text" and got[1].line == 3
    assert got[2].messages == (("system", "be brief"), ("user", "hi"), ("assistant", "yo"))
    assert isinstance(InvalidDataset("x"), InvalidRequest)


@pytest.mark.parametrize(
    ("data", "words", "field"),
    [
        (b"", "empty", "dataset"),
        (b"\n  \n", "empty", "dataset"),
        (b"prompt,completion\nq,a\n", "line 1: not a JSON object", "dataset"),
        (b'{"prompt": "q", "completion": "a"}\n[1, 2]\n', "line 2: a line must be a JSON", None),
        (b'{"prompt": "q"}\n', "missing field 'completion'", "dataset.completion"),
        (b'{"completion": "a"}\n', "missing field 'prompt'", "dataset.prompt"),
        (b'{"prompt": "q", "completion": ""}\n', "non-empty", "dataset.completion"),
        (b'{"prompt": 3, "completion": "a"}\n', "prompt must be a string", "dataset.prompt"),
        (b'{"text": ""}\n', "non-empty", "dataset.text"),
        (b'{"text": "a", "prompt": "q"}\n', "mixed", "dataset.text"),
        (b'{"txt": "a"}\n', "unknown key 'txt'", "dataset.txt"),
        (b'{"messages": []}\n', "non-empty list", "dataset.messages"),
        (b'{"messages": "hi"}\n', "non-empty list", "dataset.messages"),
        (
            b'{"messages": [{"role": "robot", "content": "x"}]}\n',
            "role must be one of",
            "dataset.messages[0].role",
        ),
        (
            b'{"messages": [{"role": "user", "content": "x"}]}\n',
            "assistant",
            "dataset.messages",
        ),
        (
            b'{"messages": [{"role": "user"}]}\n',
            "exactly role and content",
            "dataset.messages[0]",
        ),
        (
            b'{"messages": [{"role": "assistant", "content": 5}]}\n',
            "content must be a string",
            "dataset.messages[0].content",
        ),
        (b'{"text": "ok"}\n\xff\xfe\n', "line 2: not UTF-8", "dataset"),
        (b'{"text": "a"}\n{"text": "b"', "line 2: not a JSON object", "dataset"),
        (b"[" * 100_000, "not a JSON object", "dataset"),
    ],
)
def test_bad_datasets_are_refused_naming_line_and_field(
    data: bytes, words: str, field: str | None
) -> None:
    with pytest.raises(InvalidDataset) as caught:
        parse(data)
    assert words in caught.value.message
    if field is not None:
        assert caught.value.field == field


def test_size_and_count_limits() -> None:
    line = json.dumps({"prompt": "q", "completion": "a"}).encode() + b"\n"
    with pytest.raises(InvalidDataset, match="over the limit of 100"):
        parse(line * 10, max_bytes=100)
    with pytest.raises(InvalidDataset, match="line 4: more than 3 examples"):
        parse(line * 4, max_examples=3)
    assert len(parse(line * 3, max_examples=3)) == 3
    with pytest.raises(InvalidDataset, match="must be bytes"):
        parse_dataset("text", max_bytes=10, max_examples=1)  # type: ignore[arg-type]


def test_digest() -> None:
    assert dataset_digest(b"") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_refuse_typed(data: bytes) -> None:
    try:
        examples = parse(data)
    except InvalidDataset as exc:
        assert exc.field is not None and exc.field.startswith("dataset")
    else:
        assert examples and all(e.line >= 1 for e in examples)
