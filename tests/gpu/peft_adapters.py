"""PEFT adapters of the tiny model for the serving tests: several ranks and target modules,
written by PEFT's own ``save_pretrained`` (the ``adapter_dirs`` fixture in conftest builds them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS: dict[str, dict[str, Any]] = {
    "r4-qv": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "r64-all-rslora": {"r": 64, "lora_alpha": 16, "use_rslora": True, "target_modules": ALL},
    "r16-mlp-patterns": {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "rank_pattern": {"up_proj": 8},
        "alpha_pattern": {"down_proj": 5},
    },
    "r32-attn-layer1": {
        "r": 32,
        "lora_alpha": 64,
        "target_modules": ["q_proj", "k_proj", "o_proj"],
        "layers_to_transform": [1],
    },
    "r8-all": {"r": 8, "lora_alpha": 4, "target_modules": ALL},
}


def make_adapter(model_dir: Path, out: Path, seed: int, **lora: Any) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # PEFT's own random init is small next to the tiny model's weights
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(4.0)
    peft_model.save_pretrained(out)
    return out
