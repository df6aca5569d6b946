"""Multi-LoRA serving against PEFT itself, on the tiny model (CPU, float32).

Rules: every adapter is created and saved by PEFT (random non-zero B, or trained by a real
optimizer step) and reaches the engine only through Vajra's path: validate (vajra.adapters) ->
pack -> pool. The reference for a row is PEFT with that adapter alone (or the plain model for
a base row), one prompt at a time; Vajra serves all rows in one mixed batch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.gpu.peft_adapters import ADAPTERS
from vajra.adapters import BaseModelSpec, base_model_spec
from vajra.gpu import GenerationRequest, SamplingParams, StepOutput, TorchEngine
from vajra.gpu.lora import LoraBatchState, LoraPool, inject_lora, pack_adapter_dir

PROMPTS = [
    "The river town woke slowly on the first cold morning of autumn.",
    "Hi",
    "12 + 30 = ",
    "Servers answer requests; models predict the next word",
    "Lamps were lit one by one along the water",
    "zzqx wvv",
    "He answered every letter, sometimes correctly, and always with a drawing.",
]


@pytest.fixture(scope="module")
def spec(tiny_model_dir: Path) -> BaseModelSpec:
    return base_model_spec(tiny_model_dir)


@pytest.fixture(scope="module")
def served(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], spec: BaseModelSpec
) -> tuple[TorchEngine, dict[str, int]]:
    engine = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=8, max_adapters=12)
    adapters = engine.adapters
    assert adapters is not None
    slots = {
        name: adapters.load(pack_adapter_dir(path, spec, adapters.layout))
        for name, path in adapter_dirs.items()
    }
    return engine, slots


def peft_model(model_dir: Path, adapter_dir: Path | None) -> Any:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter_dir is None:
        return model
    return PeftModel.from_pretrained(model, adapter_dir).eval()


@dataclass(frozen=True)
class Wrapped:
    """A plain transformers model with Vajra's LoRA layers injected, outside any engine."""

    model: Any
    tokenizer: Any
    state: LoraBatchState

    @classmethod
    def load(cls, model_dir: Path, max_adapters: int = 12) -> Wrapped:
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        state = LoraBatchState(LoraPool.for_model(model, max_vram_adapters=max_adapters))
        inject_lora(model, state)
        return cls(model, AutoTokenizer.from_pretrained(model_dir), state)


@pytest.fixture(scope="module")
def wrapped(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], spec: BaseModelSpec
) -> tuple[Wrapped, dict[str, int]]:
    w = Wrapped.load(tiny_model_dir)
    pool = w.state.pool
    slots = {n: pool.load(pack_adapter_dir(p, spec, pool.layout)) for n, p in adapter_dirs.items()}
    return w, slots


def batch_logits(
    w: Wrapped, prompts: Sequence[str], slots: Sequence[int | None]
) -> list[torch.Tensor]:
    """All positions' logits of every prompt, run as ONE left-padded mixed batch (row form)."""
    ids = [w.tokenizer(p).input_ids for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode(), w.state.rows(slots):
        logits = w.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits
    return [logits[row, width - len(i) :] for row, i in enumerate(ids)]


def test_mixed_batch_logits_equal_peft_per_adapter(
    tiny_model_dir: Path,
    adapter_dirs: dict[str, Path],
    wrapped: tuple[Wrapped, dict[str, int]],
) -> None:
    w, slots = wrapped
    names: list[str | None] = [*ADAPTERS, None, "r4-qv", None, "r64-all-rslora"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(names))]
    base = peft_model(tiny_model_dir, None)
    # Warm-up: on the CPU the first forward of a fresh model at this padded shape sometimes
    # differs from every later one by ~1e-3 in a contiguous half of the rows, with no adapter
    # at all (seen in about one run in three after other tests ran in the process), so the
    # comparison below starts from the second.
    batch_logits(w, prompts, [None] * len(names))
    for mode in ("auto", "gather", "segmented"):
        w.state.mode = mode
        got = batch_logits(w, prompts, [None if n is None else slots[n] for n in names])
        for row, (name, prompt) in enumerate(zip(names, prompts, strict=True)):
            ids = w.tokenizer(prompt, return_tensors="pt").input_ids
            reference = peft_model(tiny_model_dir, None if name is None else adapter_dirs[name])
            with torch.inference_mode():
                want = reference(ids).logits[0]
                plain = base(ids).logits[0]
            scale = want.abs().max()
            assert (got[row] - want).abs().max() <= 1e-4 * scale, (mode, row, name)
            if name is not None:  # the adapter matters, so equality above means something
                assert (want - plain).abs().max() > 0.05 * scale, name
    w.state.mode = "auto"


def test_one_packed_forward_of_many_prompts_equals_peft_per_prompt(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path], wrapped: tuple[Wrapped, dict[str, int]]
) -> None:
    """The paged engine's forward: every prompt of a step packed into one [1, T] input (a
    block-diagonal causal mask, positions restarting per prompt), adapters by segment, one
    prompt a single token (a length-1 segment: the gather path), two prompts of one adapter
    side by side (one merged segment)."""
    w, slots = wrapped
    names: list[str | None] = [None, "r64-all-rslora", "r16-mlp-patterns", "r4-qv", *ADAPTERS]
    ids = [w.tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids for i in range(len(names))]
    ids[2] = ids[2][:1]  # one token
    segments: list[tuple[int, int, int | None]] = []
    positions: list[int] = []
    start = 0
    for name, prompt in zip(names, ids, strict=True):
        segments.append((start, len(prompt), None if name is None else slots[name]))
        positions += range(len(prompt))
        start += len(prompt)
    mask = torch.zeros(1, 1, start, start, dtype=torch.bool)
    for first, length, _ in segments:
        mask[0, 0, first : first + length, first : first + length] = torch.ones(
            length, length, dtype=torch.bool
        ).tril()
    w.state.set_segments(segments, start)
    with torch.inference_mode():
        logits = w.model(
            input_ids=torch.tensor([[t for prompt in ids for t in prompt]]),
            attention_mask=mask,
            position_ids=torch.tensor([positions]),
        ).logits[0]
    w.state.clear()
    for (first, length, _), name, prompt in zip(segments, names, ids, strict=True):
        reference = peft_model(tiny_model_dir, None if name is None else adapter_dirs[name])
        with torch.inference_mode():
            want = reference(torch.tensor([prompt])).logits[0]
        got = logits[first : first + length]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name


def run(engine: TorchEngine, admit: dict[int, list[GenerationRequest]]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = defaultdict(list)
    finished: set[str] = set()
    step = 0
    while step <= max(admit) or engine.has_work():
        outs: list[StepOutput] = engine.step(admit.get(step, []), [])
        for out in outs:
            assert out.error is None, out.error
            tokens[out.request_id] += out.token_ids
            if out.finished:
                finished.add(out.request_id)
        step += 1
        assert step < 500
    assert finished == set(tokens)
    return tokens


def peft_greedy(model: Any, tokenizer: Any, prompt: str, n: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n
        )
    generated: list[int] = out[0, ids.shape[1] :].tolist()
    return generated


def test_greedy_generation_equals_peft_generate_token_for_token(
    tiny_model_dir: Path,
    adapter_dirs: dict[str, Path],
    served: tuple[TorchEngine, dict[str, int]],
) -> None:
    engine, slots = served
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    names: list[str | None] = [None, *ADAPTERS, None, "r8-all", "r16-mlp-patterns", None]
    lengths = [6, 12, 20, 9, 15, 4, 11, 8, 16, 10]
    admit: dict[int, list[GenerationRequest]] = defaultdict(list)
    for i, (name, n) in enumerate(zip(names, lengths, strict=True)):
        slot = None if name is None else slots[name]
        params = SamplingParams(max_tokens=n, temperature=0.0)
        admit[(i * 3) % 7].append(GenerationRequest(f"r{i}", PROMPTS[i % 7], params, slot))
    got = run(engine, admit)  # 8 rows at most: rows join and leave while others decode

    base_tokens: dict[str, list[int]] = {}
    for i, (name, n) in enumerate(zip(names, lengths, strict=True)):
        model = peft_model(tiny_model_dir, None if name is None else adapter_dirs[name])
        want = peft_greedy(model, tokenizer, PROMPTS[i % 7], n)
        assert got[f"r{i}"] == want, (i, name)
        base_tokens[f"r{i}"] = peft_greedy(
            peft_model(tiny_model_dir, None), tokenizer, PROMPTS[i % 7], n
        )
    differing = [r for r in got if got[r] != base_tokens[r]]
    assert len(differing) >= 5  # the adapters change what the model writes


def test_adapter_trained_by_peft_is_served_unchanged(
    tiny_model_dir: Path, tmp_path: Path, spec: BaseModelSpec
) -> None:
    torch.manual_seed(7)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    trainee = get_peft_model(model, config)  # PEFT's default init: B = 0
    trainee.train()
    optimizer = torch.optim.AdamW([p for p in trainee.parameters() if p.requires_grad], lr=3e-2)
    batch = tokenizer(
        ["The river town woke slowly", "Servers answer requests"], padding=True, return_tensors="pt"
    )
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    for _ in range(8):
        loss = trainee(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trainee.save_pretrained(tmp_path)

    engine = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=4, max_adapters=4)
    assert engine.adapters is not None
    slot = engine.adapters.load(pack_adapter_dir(tmp_path, spec, engine.adapters.layout))
    reference = peft_model(tiny_model_dir, tmp_path)
    prompt = "The river town"
    want = peft_greedy(reference, tokenizer, prompt, 12)
    base = peft_greedy(peft_model(tiny_model_dir, None), tokenizer, prompt, 12)
    assert want != base  # training changed the model
    params = SamplingParams(max_tokens=12, temperature=0.0)
    got = run(
        engine,
        {
            0: [
                GenerationRequest("tuned", prompt, params, slot),
                GenerationRequest("base", prompt, params),
            ]
        },
    )
    assert got["tuned"] == want
    assert got["base"] == base
    alone = Wrapped.load(tiny_model_dir, max_adapters=1)
    pool = alone.state.pool
    logits = batch_logits(
        alone, [prompt], [pool.load(pack_adapter_dir(tmp_path, spec, pool.layout))]
    )[0]
    with torch.inference_mode():
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = reference(ids).logits[0]
    assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_unknown_slot_is_refused(served: tuple[TorchEngine, dict[str, int]]) -> None:
    engine, _ = served
    assert engine.adapters is not None
    loaded = engine.adapters.resident()
    free = next(s for s in range(engine.adapters.num_slots) if s not in loaded)
    request = GenerationRequest("x", "Hi", SamplingParams(max_tokens=2), free)
    (out,) = engine.step([request], [])
    assert out.finished and out.finish_reason == "error"
    assert out.error is not None and out.error.field == "adapter"


def test_engine_without_pool_refuses_adapter_rows(tiny_model_dir: Path) -> None:
    engine = TorchEngine(tiny_model_dir, device="cpu")
    assert engine.adapters is None
    (out,) = engine.step([GenerationRequest("x", "Hi", SamplingParams(max_tokens=2), 0)], [])
    assert out.finish_reason == "error" and out.error is not None
