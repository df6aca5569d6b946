"""Fixtures for the engine tests, on the session's tiny random Llama (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The same model and tokenizer loaded plainly with transformers, for ``generate``."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer
