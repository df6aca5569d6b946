"""Training on the serving engine's frozen core (tiny model, CPU, float32).

Memorisation of 20 prompt/completion pairs (loss below 0.3 nats per token), then the trained adapter,
loaded the way served adapters are, reproduces every completion greedily; inference during
training is token-for-token what it is without a job, preemption on or off; the base
weights are never copied; a job resumed from a checkpoint ends bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gpu.training_kit import jsonl, pairs, storages
from vajra.adapters.format import base_model_spec, validate_adapter
from vajra.errors import InvalidRequest
from vajra.gpu.engine import TorchEngine
from vajra.gpu.interface import GenerationRequest
from vajra.gpu.lora import pack_adapter, read_adapter_tensors
from vajra.gpu.training import Interleaver, LoraTrainer, TrainExample, tokenize_examples
from vajra.policies.decoding import SamplingParams
from vajra.policies.training import TrainParams
from vajra.training import parse_dataset

#: Mean loss per target token the memorisation run must get below. The tiny random model
#: (2 layers of width 64) plateaus near 0.2 with rank 16 on every module; greedy decoding
#: is exact well before that.
MEMORISED_LOSS = 0.3
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> TorchEngine:
    return TorchEngine(
        tiny_model_dir, device="cpu", max_batch_size=8, max_adapters=4, max_batch_tokens=64
    )


def examples_of(engine: TorchEngine, rows: list[dict[str, str]]) -> list[TrainExample]:
    parsed = parse_dataset(jsonl(rows), max_bytes=1 << 20, max_examples=1000)
    return tokenize_examples(parsed, engine.tokenizer, max_len=engine.max_model_len)


def generate(
    engine: TorchEngine, prompts: list[str], slot: int | None, max_tokens: int = 12
) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    admit = [GenerationRequest(f"r{i}", p, params, slot) for i, p in enumerate(prompts)]
    out: dict[str, list[int]] = {r.request_id: [] for r in admit}
    for _ in range(500):
        for o in engine.step(admit, []):
            assert o.error is None
            out[o.request_id] += o.token_ids
        admit = []
        if not engine.has_work():
            return out
    raise AssertionError("generation did not finish")


def test_memorises_and_served_adapter_reproduces_completions(engine: TorchEngine) -> None:
    rows = pairs(20, seed=1)
    examples = examples_of(engine, rows)
    params = TrainParams(
        rank=16, alpha=32.0, target_modules=ALL, learning_rate=1e-2, batch_size=20, epochs=150
    )
    trainer = LoraTrainer(engine, engine.tokenizer, examples, params)
    losses = []
    while not trainer.finished:
        report = trainer.micro_step()
        if report is not None:
            losses.append(report.loss)
            if report.loss < MEMORISED_LOSS / 4:
                break
    assert losses[0] > 3.0 and min(losses) < MEMORISED_LOSS, losses[::10]
    config, weights = trainer.adapter_files()
    trainer.close()
    adapters = engine.adapters
    assert adapters is not None
    manifest = validate_adapter(
        config, weights, base_model_spec(engine_dir(engine)), max_rank=64, max_bytes=1 << 24
    )
    slot = adapters.load(pack_adapter(manifest, read_adapter_tensors(weights), adapters.layout))
    try:
        got = generate(engine, [r["prompt"] for r in rows], slot)
        eos = engine.tokenizer.eos_token_id
        for i, row in enumerate(rows):
            want = engine.tokenizer.encode(row["completion"], add_special_tokens=False)
            assert got[f"r{i}"] == [*want, eos], (row, engine.tokenizer.decode(got[f"r{i}"]))
    finally:
        adapters.free(slot)


def engine_dir(engine: TorchEngine) -> Path:
    return Path(engine.model.config._name_or_path)


@pytest.mark.parametrize("preempt", [True, False])
def test_inference_during_training_is_unchanged(engine: TorchEngine, preempt: bool) -> None:
    prompts = ["The river town", "Servers answer requests", "A small train arrived at"]
    alone = generate(engine, prompts, None)
    examples = examples_of(engine, pairs(8))
    params = TrainParams(learning_rate=1e-2, batch_size=2, epochs=4, max_micro_tokens=32)
    trainer = LoraTrainer(engine, engine.tokenizer, examples, params)
    loop = Interleaver(engine, trainer, preemption_enabled=preempt, inference_ratio=2)
    sampling = SamplingParams(max_tokens=12, temperature=0.0)
    loop.submit([GenerationRequest(f"r{i}", p, sampling) for i, p in enumerate(prompts)])
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    kinds = []
    for _ in range(2000):
        ran = loop.run_once()
        kinds.append(ran.kind)
        for o in ran.outputs:
            got[o.request_id] += o.token_ids
        if ran.kind == "idle":
            break
    assert got == alone
    assert trainer.finished and "train" in kinds[: kinds.index("idle")]
    first_train = kinds.index("train")
    assert first_train == (2 if preempt else 1)
    trainer.close()
    assert generate(engine, prompts, None) == alone


def test_base_weights_are_not_copied(engine: TorchEngine) -> None:
    model = engine.model
    before_ptrs = [p.data_ptr() for p in model.parameters()]
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    before = storages("cpu")
    params = TrainParams(rank=4, target_modules=("q_proj", "v_proj"), max_steps=2)
    trainer = LoraTrainer(engine, engine.tokenizer, examples_of(engine, pairs(8)), params)
    while not trainer.finished:
        trainer.micro_step()
    after = storages("cpu")
    grown = sum(n for ptr, n in after.items() if ptr not in before)
    held = sum(p.numel() * 4 * 3 for p in trainer._trainable)  # weights + 2 AdamW moments
    assert grown < held + base_bytes // 4, (grown, held, base_bytes)
    assert [p.data_ptr() for p in model.parameters()] == before_ptrs
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert model.config._attn_implementation == "vajra_paged" and not model.training
    trainer.close()


def test_resume_from_checkpoint_is_bit_identical(engine: TorchEngine) -> None:
    examples = examples_of(engine, pairs(10))
    params = TrainParams(
        learning_rate=1e-2, batch_size=3, grad_accum_steps=2, epochs=3, max_steps=5
    )
    whole = LoraTrainer(engine, engine.tokenizer, examples, params)
    first = LoraTrainer(engine, engine.tokenizer, examples, params)
    losses, resumed_losses = [], []
    while not whole.finished:
        r = whole.micro_step()
        if r is not None:
            losses.append(r.loss)
    while first.step < 2:
        first.micro_step()
    first.micro_step()  # part of step 3: not in the checkpoint, redone after the restore
    data = first.checkpoint()
    first.close()
    resumed = LoraTrainer.restore(engine, engine.tokenizer, examples, params, checkpoint=data)
    assert resumed.step == 2 and resumed.total_steps == 5
    while not resumed.finished:
        r = resumed.micro_step()
        if r is not None:
            resumed_losses.append(r.loss)
    assert resumed_losses == losses[2:]
    a, b = whole.adapter_tensors(), resumed.adapter_tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = TrainParams.from_dict({**params.to_dict(), "seed": 1})
    with pytest.raises(InvalidRequest, match="other parameters"):
        LoraTrainer.restore(engine, engine.tokenizer, examples, other, checkpoint=data)
    for bad in (b"", b"garbage" * 10, data[: len(data) // 2]):
        with pytest.raises(InvalidRequest) as caught:
            LoraTrainer.restore(engine, engine.tokenizer, examples, params, checkpoint=bad)
        assert caught.value.field == "checkpoint"


def test_continue_from_an_adapter(engine: TorchEngine) -> None:
    examples = examples_of(engine, pairs(4))
    params = TrainParams(max_steps=1)
    start = LoraTrainer(engine, engine.tokenizer, examples, TrainParams(rank=4, seed=5))
    init = start.adapter_tensors()
    with torch.no_grad():
        init = {k: v + 0.01 for k, v in init.items()}
    trainer = LoraTrainer(engine, engine.tokenizer, examples, params, init=init, init_alpha=8.0)
    assert trainer.rank == 4 and trainer.scale == 2.0
    got = trainer.adapter_tensors()
    assert all(torch.equal(got[k], init[k]) for k in init)
    bad = dict(init)
    bad.pop(next(iter(bad)))
    with pytest.raises(InvalidRequest, match="lack"):
        LoraTrainer(engine, engine.tokenizer, examples, params, init=bad)
    with pytest.raises(InvalidRequest, match="not a PEFT LoRA key"):
        LoraTrainer(engine, engine.tokenizer, examples, params, init={"x": torch.zeros(1)})


def test_bad_jobs_are_refused_before_training(engine: TorchEngine) -> None:
    examples = examples_of(engine, pairs(4))
    with pytest.raises(InvalidRequest) as caught:
        LoraTrainer(engine, engine.tokenizer, examples, TrainParams(target_modules=("qkv",)))
    assert caught.value.field == "target_modules"
    with pytest.raises(InvalidRequest, match="max_micro_tokens"):
        LoraTrainer(engine, engine.tokenizer, examples, TrainParams(max_micro_tokens=4))
    with pytest.raises(InvalidRequest, match="no examples"):
        LoraTrainer(engine, engine.tokenizer, [], TrainParams())
