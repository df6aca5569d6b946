"""Load a Hugging Face causal LM and its tokenizer from a local directory, frozen for inference.

Nothing is fetched from a hub: ``model_dir`` must hold the config, the weights and the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # transformers.PreTrainedModel, in eval mode with requires_grad off
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    device: torch.device
    eos_token_ids: frozenset[int]  # generation stops after any of these
    max_position_embeddings: int


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_dir: Path, *, device: str | None = None, dtype: str = "auto") -> LoadedModel:
    """Load ``model_dir`` onto ``device`` (CUDA when available if ``None``).

    ``dtype`` is ``"auto"`` (bfloat16 on CUDA, float16 on a GPU without bfloat16, float32 on
    the CPU), ``"float32"``, ``"float16"`` or ``"bfloat16"``.
    """
    target = torch.device(device or default_device())
    if dtype == "auto":
        torch_dtype: torch.dtype = torch.float32
        if target.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()  # type: ignore[no-untyped-call]
            torch_dtype = torch.bfloat16 if bf16 else torch.float16
    elif dtype in _DTYPES:
        torch_dtype = _DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto or one of {sorted(_DTYPES)}")

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype, local_files_only=True, attn_implementation="sdpa"
    )
    model.to(target)
    model.eval()
    model.requires_grad_(False)

    eos: set[int] = set()
    try:
        generation = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        eos.update(_as_ids(generation.eos_token_id))
    except OSError:  # no generation_config.json
        pass
    eos.update(_as_ids(model.config.eos_token_id))
    eos.update(_as_ids(tokenizer.eos_token_id))
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=target,
        eos_token_ids=frozenset(eos),
        max_position_embeddings=int(model.config.max_position_embeddings),
    )


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)
