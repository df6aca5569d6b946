"""Adapter rows in the paged engine's packed batches, against PEFT (tiny model, CPU, float32).

Base rows and rows of adapters of ranks 4 to 64 on different modules share packed steps with
chunked prefill, arriving at random steps: each request's greedy tokens equal PEFT's greedy
``generate`` for its adapter, and one packed forward's logits equal PEFT's within 1e-4
relative. The prefix cache never hands one adapter version's blocks to another.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.gpu.peft_adapters import ADAPTERS, make_adapter
from tests.gpu.test_paged_engine import prompt_of
from vajra.adapters.format import base_model_spec
from vajra.gpu.engine import TorchEngine
from vajra.gpu.interface import GenerationRequest, StepOutput
from vajra.gpu.lora import pack_adapter_dir
from vajra.policies.decoding import SamplingParams


@pytest.fixture(scope="module")
def served(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> tuple[TorchEngine, dict[str, int]]:
    engine = TorchEngine(
        tiny_model_dir, device="cpu", max_batch_size=8, max_adapters=12, max_batch_tokens=128
    )
    adapters = engine.adapters
    assert adapters is not None
    spec = base_model_spec(tiny_model_dir)
    slots = {
        name: adapters.load(pack_adapter_dir(path, spec, adapters.layout))
        for name, path in adapter_dirs.items()
    }
    return engine, slots


def peft(tiny_model_dir: Path, adapter_dir: Path | None) -> Any:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir).eval()


def greedy(model: Any, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    return list(out[0, len(ids) :].tolist())


def drive(engine: TorchEngine, admit: dict[int, list[GenerationRequest]]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = defaultdict(list)
    finished: set[str] = set()
    step = 0
    while step <= max(admit, default=0) or engine.has_work():
        out: StepOutput
        for out in engine.step(admit.get(step, []), []):
            assert out.error is None, out.error
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finished.add(out.request_id)
        step += 1
        assert step < 3000
    assert finished == set(tokens)
    return tokens


def test_adapter_and_base_rows_in_packed_chunked_steps_equal_peft_generate(
    tiny_model_dir: Path,
    adapter_dirs: dict[str, Path],
    served: tuple[TorchEngine, dict[str, int]],
) -> None:
    engine, slots = served
    rng = random.Random(3)
    names: list[str | None] = [None, *ADAPTERS]
    lengths = [1, 9, 31, 64, 200, 480, 900, 1500]
    admit: dict[int, list[GenerationRequest]] = defaultdict(list)
    asked: dict[str, tuple[str | None, str]] = {}
    for i, n in enumerate(lengths):
        name = names[i % len(names)]
        prompt = "" if n == 1 else prompt_of(engine.tokenizer, n, seed=40 + i)
        rid = f"{name or 'base'}-{i}"
        slot = None if name is None else slots[name]
        admit[rng.randrange(0, 25)].append(
            GenerationRequest(rid, prompt, SamplingParams(max_tokens=6), slot)
        )
        asked[rid] = (name, prompt)
    got = drive(engine, admit)
    models: dict[str | None, Any] = {}
    for rid, (name, prompt) in asked.items():
        if name not in models:
            models[name] = peft(tiny_model_dir, None if name is None else adapter_dirs[name])
        want = greedy(models[name], engine._encode(prompt), 6)
        assert got[rid] == want[: len(got[rid])], rid


def test_one_packed_forward_of_mixed_adapters_matches_peft_logits(
    tiny_model_dir: Path,
    adapter_dirs: dict[str, Path],
    served: tuple[TorchEngine, dict[str, int]],
) -> None:
    engine, slots = served
    names: list[str | None] = [*ADAPTERS, None]
    prompts = [
        engine._encode(prompt_of(engine.tokenizer, 10 + 23 * i, seed=i)) for i in range(len(names))
    ]
    rows = engine.packed_logits(prompts, [None if n is None else slots[n] for n in names])
    for name, ids, logits in zip(names, prompts, rows, strict=True):
        model = peft(tiny_model_dir, None if name is None else adapter_dirs[name])
        with torch.inference_mode():
            want = model(torch.tensor([ids])).logits[0]
        scale = want.abs().max()
        assert ((logits - want).abs().max() / scale).item() < 1e-4, name


def test_a_new_adapter_version_never_reads_the_old_versions_blocks(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Version 2 of an adapter (different weights, same name) on the same prompt right after
    version 1: no prefix hit, and PEFT's version-2 output."""
    v1 = adapter_dirs["r4-qv"]
    v2 = make_adapter(tiny_model_dir, tmp_path / "r4-qv-v2", 77, **ADAPTERS["r4-qv"])
    engine = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=4, max_adapters=4)
    adapters = engine.adapters
    assert adapters is not None
    spec = base_model_spec(tiny_model_dir)
    slot1 = adapters.load(pack_adapter_dir(v1, spec, adapters.layout))
    prompt = prompt_of(engine.tokenizer, 400, seed=9)
    ids = engine._encode(prompt)
    first = drive(
        engine, {0: [GenerationRequest("v1", prompt, SamplingParams(max_tokens=8), slot1)]}
    )
    again = drive(
        engine, {0: [GenerationRequest("v1b", prompt, SamplingParams(max_tokens=8), slot1)]}
    )
    assert again["v1b"] == first["v1"]
    hits_same_version = engine.kv_stats()["prefix_hits"]
    assert hits_same_version >= len(ids) // 16 - 1  # the same version shares its blocks
    adapters.free(slot1)
    slot2 = adapters.load(pack_adapter_dir(v2, spec, adapters.layout))
    second = drive(
        engine, {0: [GenerationRequest("v2", prompt, SamplingParams(max_tokens=8), slot2)]}
    )
    assert engine.kv_stats()["prefix_hits"] == hits_same_version  # nothing of v1 reused
    assert second["v2"] == greedy(peft(tiny_model_dir, v2), ids, 8)
    assert second["v2"] != first["v1"]
    base = drive(engine, {0: [GenerationRequest("b", prompt, SamplingParams(max_tokens=8))]})
    assert engine.kv_stats()["prefix_hits"] == hits_same_version  # nor the base model
    assert base["b"] == greedy(peft(tiny_model_dir, None), ids, 8)
