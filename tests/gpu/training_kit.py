"""Shared pieces of the training tests: small datasets and PEFT's own training loop, the
reference the trainer is compared with (same init, data order, loss and AdamW)."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from vajra.bench.train import WORDS
from vajra.gpu.training import TrainExample
from vajra.policies.training import TrainParams, step_examples


def pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct prompt/completion pairs made of corpus words (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        picks = torch.randint(0, len(WORDS), (5,), generator=g).tolist()
        prompt = f"Item {i}: the {WORDS[picks[0]]} and the {WORDS[picks[1]]} ->"
        completion = f" {WORDS[picks[2]]} {WORDS[picks[3]]} {WORDS[picks[4]]}."
        out.append({"prompt": prompt, "completion": completion})
    return out


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def peft_train(
    model_dir: Path,
    examples: list[TrainExample],
    params: TrainParams,
    init: dict[str, torch.Tensor],
    *,
    pad: int = 0,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """PEFT's LoRA on a plain transformers model, HF-Trainer style: per optimizer step,
    ``grad_accum_steps`` batches of ``batch_size`` padded rows, loss = sum of target-token
    cross-entropies / target tokens of the step, AdamW. Returns the step losses and the final
    adapter (PEFT keys)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,
        target_modules=list(params.target_modules),
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in init.items():
            named[key.replace(".weight", ".default.weight")].copy_(value)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(v.numel() for v in init.values())
    optimizer = torch.optim.AdamW(
        trainable, lr=params.learning_rate, weight_decay=params.weight_decay
    )
    peft_model.train()
    losses = []
    for chosen in step_examples(len(examples), params):
        rows = [examples[i] for i in chosen]
        targets = sum(e.num_targets for e in rows)
        total = 0.0
        for first in range(0, len(rows), params.batch_size):
            batch = rows[first : first + params.batch_size]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100)
            for r, e in enumerate(batch):
                n = len(e.input_ids)
                ids[r, :n] = torch.tensor(e.input_ids)
                mask[r, :n] = 1
                for t in range(n):
                    if e.loss_mask[t]:
                        labels[r, t] = e.input_ids[t]
            logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            loss = (
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
                )
                / targets
            )
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    final = {
        k.replace(".default.weight", ".weight"): v.detach().clone()
        for k, v in peft_model.named_parameters()
        if v.requires_grad
    }
    return losses, final


def storages(device_type: str) -> dict[int, int]:
    """Every live tensor's storage on ``device_type`` ("cpu", "cuda"): address -> bytes. Counts
    tensors only, not what libraries hold beside them (cuBLAS workspaces, allocator caches)."""
    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == device_type:
            try:
                storage = obj.untyped_storage()
            except RuntimeError:  # a tensor without storage of its own
                continue
            seen[storage.data_ptr()] = storage.nbytes()
    return seen
