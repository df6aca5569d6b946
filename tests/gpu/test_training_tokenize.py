"""Which tokens a training step learns: completions, whole texts, assistant turns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from vajra.gpu.training import tokenize_examples
from vajra.training import Example, InvalidDataset


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def targets(tok: Any, ids: list[int], mask: list[bool]) -> str:
    return str(tok.decode([t for t, m in zip(ids, mask, strict=True) if m]))


def test_prompt_completion_targets_the_completion_and_eos(tokenizer: Any) -> None:
    (ex,) = tokenize_examples(
        [Example(prompt="Q: two?", completion=" A: 2")], tokenizer, max_len=64
    )
    assert ex.input_ids[0] == tokenizer.bos_token_id and ex.input_ids[-1] == tokenizer.eos_token_id
    assert targets(tokenizer, ex.input_ids, ex.loss_mask) == " A: 2</s>"
    assert not ex.loss_mask[0]
    assert tokenizer.decode(ex.input_ids[: ex.loss_mask.index(True)]) == "<s>Q: two?"
    (empty,) = tokenize_examples([Example(prompt="", completion="x")], tokenizer, max_len=64)
    assert (
        empty.input_ids[0] == tokenizer.bos_token_id
        and targets(tokenizer, empty.input_ids, empty.loss_mask) == "x</s>"
    )


def test_text_targets_everything_after_the_first_token(tokenizer: Any) -> None:
    (ex,) = tokenize_examples([Example(text="The river town")], tokenizer, max_len=64)
    assert ex.loss_mask == [False] + [True] * (len(ex.input_ids) - 1)
    assert ex.num_targets == len(ex.input_ids) - 1


def test_chat_targets_assistant_turns_only(tokenizer: Any) -> None:
    chat = Example(
        messages=(
            ("system", "be brief"),
            ("user", "hi"),
            ("assistant", "hello"),
            ("user", "again"),
            ("assistant", "bye"),
        )
    )
    (ex,) = tokenize_examples([chat], tokenizer, max_len=256)
    rendered = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in chat.messages or ()], tokenize=False
    )
    assert tokenizer.decode(ex.input_ids) == rendered
    assert targets(tokenizer, ex.input_ids, ex.loss_mask) == "hello</s>\nbye</s>\n"


def test_refusals_name_the_line(tokenizer: Any) -> None:
    long = Example(text="word " * 200, line=7)
    with pytest.raises(InvalidDataset, match=r"line 7: .* over the limit of 50"):
        tokenize_examples([Example(text="ok", line=6), long], tokenizer, max_len=50)
    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    chat = Example(messages=(("user", "a"), ("assistant", "b")), line=3)
    with pytest.raises(InvalidDataset, match=r"line 3: .*chat template") as caught:
        tokenize_examples([chat], plain, max_len=64)
    assert caught.value.field == "dataset.messages"
