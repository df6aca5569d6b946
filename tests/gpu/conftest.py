"""Fixtures for the engine tests, on the session's tiny random Llama (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.gpu.peft_adapters import ADAPTERS, make_adapter


@pytest.fixture(scope="session")
def reference(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The same model and tokenizer loaded plainly with transformers, for ``generate``."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every adapter of ``ADAPTERS``, saved by PEFT, by name."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(tiny_model_dir, root / name, seed, **lora)
        for seed, (name, lora) in enumerate(ADAPTERS.items(), start=1)
    }
