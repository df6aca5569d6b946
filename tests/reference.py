"""What transformers (and PEFT) themselves generate: the reference Vajra's outputs must equal."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

#: Target module sets the adapters of :func:`save_peft_adapters` cycle through.
TARGET_SETS = (
    ("q_proj", "v_proj", "down_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj"),
    ("gate_proj", "up_proj", "down_proj"),
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)


def _greedy(model: Any, tok: Any, prompt: str, max_new_tokens: int) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tok.pad_token_id,
        )
    return [int(t) for t in out[0, ids.shape[1] :]]


def transformers_greedy(
    model_dir: Path, prompt: str, max_new_tokens: int, adapter: Path | None = None
) -> tuple[list[int], int | None]:
    """Greedy new-token ids for ``prompt`` from the model in ``model_dir`` (float32), through
    the PEFT adapter saved in ``adapter`` when given; also the tokenizer's EOS id, so each
    caller can cut at EOS the way the path it checks does."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return _greedy(model, tok, prompt, max_new_tokens), tok.eos_token_id


def peft_greedy_many(
    model_dir: Path, adapters: Sequence[Path], prompts: Sequence[str], max_new_tokens: int
) -> dict[tuple[Path, str], list[int]]:
    """:func:`transformers_greedy` through each adapter for each prompt, the base loaded once."""
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out: dict[tuple[Path, str], list[int]] = {}
    for adapter in adapters:
        model = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
        for prompt in prompts:
            out[adapter, prompt] = _greedy(model, tok, prompt, max_new_tokens)
    return out


def save_peft_adapters(model_dir: Path, root: Path, ranks: Sequence[int], seed: int) -> list[Path]:
    """One PEFT LoRA adapter per rank (random A and B, varied targets, alpha 2r), saved by
    PEFT itself under ``root/adapter<i>-r<rank>``."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for i, r in enumerate(ranks):
        torch.manual_seed(seed * 1000 + i)
        cfg = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=list(TARGET_SETS[i % len(TARGET_SETS)]),
            init_lora_weights=False,
        )
        path = root / f"adapter{i}-r{r}"
        get_peft_model(copy.deepcopy(base), cfg).save_pretrained(path)
        out.append(path)
    return out
