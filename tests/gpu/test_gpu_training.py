"""Training on CUDA: bf16 autocast on a bf16 base, the low-priority stream, inference first.

Rules: a job on the CUDA engine (bf16 weights, the default there) follows the float32 run on
the CPU step for step (losses within bf16 rounding, the trained weights pointing the same
way); the base is neither copied on the device nor changed; micro-steps run on a stream of
lower priority than the engine's steps; greedy inference interleaved with a job on CUDA is
token-for-token what it is alone. Skipped without a CUDA device (``make gpu-check`` runs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.gpu.training_kit import jsonl, pairs, storages
from vajra.gpu.engine import TorchEngine
from vajra.gpu.interface import GenerationRequest
from vajra.gpu.streams import INFERENCE_PRIORITY, TRAINING_PRIORITY
from vajra.gpu.training import Interleaver, LoraTrainer, TrainExample, tokenize_examples
from vajra.policies.decoding import SamplingParams
from vajra.policies.training import TrainParams
from vajra.training import parse_dataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
PARAMS = TrainParams(rank=8, alpha=16.0, learning_rate=1e-2, batch_size=4, epochs=2, seed=0)


def engine_on(model_dir: Path, device: str, dtype: str = "auto") -> TorchEngine:
    return TorchEngine(
        model_dir, device=device, dtype=dtype, max_batch_size=8, max_adapters=4, max_batch_tokens=64
    )


def examples_of(engine: TorchEngine, n: int) -> list[TrainExample]:
    parsed = parse_dataset(jsonl(pairs(n, seed=3)), max_bytes=1 << 20, max_examples=100)
    return tokenize_examples(parsed, engine.tokenizer, max_len=engine.max_model_len)


def train(trainer: LoraTrainer) -> list[float]:
    losses = []
    while not trainer.finished:
        report = trainer.micro_step()
        if report is not None:
            assert report.gpu_ms > 0
            losses.append(report.loss)
    return losses


def test_bf16_training_on_cuda_follows_float32_on_the_cpu(tiny_model_dir: Path) -> None:
    cpu = engine_on(tiny_model_dir, "cpu")
    gpu = engine_on(tiny_model_dir, "cuda")
    model = gpu.model
    assert next(model.parameters()).dtype == torch.bfloat16
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    storages_before = storages("cuda")

    on_cpu = LoraTrainer(cpu, cpu.tokenizer, examples_of(cpu, 16), PARAMS)
    on_gpu = LoraTrainer(gpu, gpu.tokenizer, examples_of(gpu, 16), PARAMS)
    assert on_gpu._stream is not None and on_gpu._stream.priority == TRAINING_PRIORITY
    assert gpu._stream.priority < on_gpu._stream.priority  # inference outranks training
    want, got = train(on_cpu), train(on_gpu)

    assert len(got) == len(want) == 8 and got[-1] < got[0] - 0.5, got
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= 0.05 + 0.01 * w, (step, got, want)
    a, b = on_cpu.adapter_tensors(), on_gpu.adapter_tensors()
    flat_a = torch.cat([a[k].flatten() for k in a])
    flat_b = torch.cat([b[k].flatten() for k in a])
    assert torch.isfinite(flat_b).all()
    assert torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0) > 0.95

    # Tensors, not the allocator's total: cuBLAS takes a fixed workspace for each new stream
    # (64 MiB on an H200), far above this tiny model's size.
    grown = sum(n for ptr, n in storages("cuda").items() if ptr not in storages_before)
    held = sum(p.numel() * 4 * 3 for p in on_gpu._trainable)  # weights + 2 AdamW moments
    assert grown < held + base_bytes // 4, (grown, held, base_bytes)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert not any(p.requires_grad or p.grad is not None for p in model.parameters())
    on_cpu.close()
    on_gpu.close()


def test_inference_interleaved_with_training_on_cuda_is_unchanged(tiny_model_dir: Path) -> None:
    engine = engine_on(tiny_model_dir, "cuda", dtype="float32")
    assert engine._stream is not None and engine._stream.priority <= INFERENCE_PRIORITY
    prompts = ["The river town", "Servers answer requests", "A small train arrived at"]
    sampling = SamplingParams(max_tokens=16, temperature=0.0)

    def requests() -> list[GenerationRequest]:
        return [GenerationRequest(f"r{i}", p, sampling) for i, p in enumerate(prompts)]

    alone: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    admit = requests()
    while admit or engine.has_work():
        for out in engine.step(admit, []):
            assert out.error is None
            alone[out.request_id] += out.token_ids
        admit = []

    params = TrainParams(learning_rate=1e-2, batch_size=2, epochs=4, max_micro_tokens=32)
    trainer = LoraTrainer(engine, engine.tokenizer, examples_of(engine, 8), params)
    loop = Interleaver(engine, trainer, preemption_enabled=True, inference_ratio=2)
    loop.submit(requests())
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    kinds = []
    for _ in range(2000):
        ran = loop.run_once()
        kinds.append(ran.kind)
        for out in ran.outputs:
            assert out.error is None
            got[out.request_id] += out.token_ids
        if ran.kind == "idle":
            break
    assert got == alone
    assert trainer.finished and "train" in kinds and kinds[-1] == "idle"
    trainer.close()
