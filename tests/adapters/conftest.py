"""What the adapter tests share: PEFT adapters saved by PEFT itself on the tiny model, and the
one "good" adapter that hostile and malformed uploads are derived from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from vajra.adapters import BaseModelSpec, base_model_spec


def peft_model(model_dir: Path, seed: int = 0, **lora: Any) -> PeftModel:
    """The tiny model wrapped by PEFT with random (non-zero) A and B."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))


def save_peft(model_dir: Path, out: Path, seed: int = 0, **lora: Any) -> Path:
    """A PEFT adapter directory, as ``save_pretrained`` writes it."""
    peft_model(model_dir, seed, **lora).save_pretrained(out)
    return out


def edit_config(config: bytes, **changes: Any) -> bytes:
    """``adapter_config.json`` with some keys changed."""
    data = json.loads(config)
    data.update(changes)
    return json.dumps(data).encode()


@pytest.fixture(scope="module")
def spec(tiny_model_dir: Path) -> BaseModelSpec:
    return base_model_spec(tiny_model_dir)


@pytest.fixture(scope="module")
def good(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(config, weights) of r=8 on q/v/down, with a rank_pattern and an alpha_pattern."""
    out = save_peft(
        tiny_model_dir,
        tmp_path_factory.mktemp("good"),
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 4},
        alpha_pattern={"v_proj": 3.0},
    )
    return (out / "adapter_config.json").read_bytes(), (
        out / "adapter_model.safetensors"
    ).read_bytes()
