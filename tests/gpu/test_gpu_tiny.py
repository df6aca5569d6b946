"""The tiny model directory is a standard, offline-loadable Hugging Face checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from vajra.gpu import init_tiny_model


def test_loads_with_auto_classes(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    generation = GenerationConfig.from_pretrained(tiny_model_dir, local_files_only=True)

    assert type(model).__name__ == "LlamaForCausalLM"
    assert (tiny_model_dir / "model.safetensors").is_file()
    assert 1000 <= len(tokenizer) == model.config.vocab_size <= 2000
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<pad>",
    )
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert ids == (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id)
    assert generation.eos_token_id == tokenizer.eos_token_id
    assert not model.config.tie_word_embeddings


def test_tokenizer_adds_bos_and_has_a_chat_template(reference: tuple[Any, Any]) -> None:
    _, tokenizer = reference
    assert tokenizer("").input_ids == [tokenizer.bos_token_id]
    assert tokenizer("river").input_ids[0] == tokenizer.bos_token_id
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s><|user|>\nhello</s>\n<|assistant|>\n"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_tokenizer_round_trips_any_text(reference: tuple[Any, Any], text: str) -> None:
    _, tokenizer = reference
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, clean_up_tokenization_spaces=False) == text


def test_same_seed_same_files_and_different_seed_different_weights(tmp_path: Path) -> None:
    start = time.perf_counter()
    a = init_tiny_model(tmp_path / "a", seed=3)
    assert time.perf_counter() - start < 10.0
    b = init_tiny_model(tmp_path / "b", seed=3)
    c = init_tiny_model(tmp_path / "c", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_init_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    init_tiny_model(tmp_path / "m", seed=9)
    assert torch.equal(torch.rand(3), expected)
