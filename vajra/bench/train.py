"""``vajra bench train``: LoRA training on the frozen core against PEFT, and what a job costs
inference.

1. **Training throughput.** The same adapter (rank, alpha, targets, seed-drawn init), the same
   data in the same optimizer steps and batches, the same loss and AdamW: Vajra's
   :class:`~vajra.gpu.training.LoraTrainer` on a :class:`~vajra.gpu.engine.TorchEngine`'s
   model (with its LoRA pool, as an executor runs it) against PEFT's own ``get_peft_model``
   on a plain transformers model, in one run; target tokens/s (padding excluded) and the
   ratio (target: at least 1.0x).
2. **Inference with a job.** Requests driven through the
   :class:`~vajra.gpu.training.Interleaver` as the executor's model thread drives them: no
   job, a job with preemption on (inference first, one micro-step per ``inference_ratio``
   steps under load) and off (alternating); TTFT and inter-token latency p50/p99, and each
   micro-step's time. Target with preemption on: p99 inter-token latency at most the no-job
   p99 plus one micro-step (the largest measured). ``--cluster``: the same through a real
   cluster and the SDK, preemption on and off (:mod:`vajra.bench.train_cluster`).

Model: :func:`vajra.bench.engine_model.build_bench_model` (``tiny`` or the ``small`` CPU
shape, ``llama-3.2-1b`` on a GPU; EOS never sampled so every request runs to its length). On
the CPU torch uses one thread. Results are JSON; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vajra.bench.engine_model import build_bench_model
from vajra.bench.result_file import Progress, partial_writer, write_result
from vajra.gpu.engine import TorchEngine
from vajra.gpu.interface import GenerationRequest
from vajra.gpu.training import Interleaver, LoraTrainer, TrainExample, tokenize_examples
from vajra.policies.decoding import SamplingParams
from vajra.policies.training import TrainParams, step_examples
from vajra.training import Example

WORDS = [
    "river", "town", "morning", "baker", "harbour", "gulls", "train", "apples", "station",
    "numbers", "daughter", "letters", "wind", "clouds", "teacher", "windows", "bells", "soup",
    "lessons", "planets", "stars", "servers", "models", "tokens",
]  # fmt: skip


def synthetic_examples(n: int, words: int, seed: int = 0) -> list[Example]:
    """``n`` prompt/completion pairs of about ``words`` words each (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        picks = torch.randint(0, len(WORDS), (words,), generator=g).tolist()
        text = [WORDS[p] for p in picks]
        half = max(1, words // 2)
        out.append(
            Example(prompt=f"{i}: " + " ".join(text[:half]), completion=" " + " ".join(text[half:]))
        )
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_vajra(
    trainer: LoraTrainer, examples: list[TrainExample], params: TrainParams, warmup: int
) -> dict[str, Any]:
    device = trainer.device
    tokens = targets = 0
    losses = []
    start = 0.0
    while not trainer.finished:
        if trainer.step == warmup and not start:
            _sync(device)
            start = time.perf_counter()
        report = trainer.micro_step()
        if report is not None:
            losses.append(report.loss)
            if report.step > warmup:
                tokens += report.tokens
    _sync(device)
    elapsed = time.perf_counter() - start
    plan = step_examples(len(examples), params)[warmup:]
    targets = sum(examples[i].num_targets for step in plan for i in step)
    trainer.close()
    return {
        "tokens_per_s": tokens / elapsed,
        "target_tokens_per_s": targets / elapsed,
        "seconds": elapsed,
        "losses": losses,
    }


def bench_peft(
    model_dir: Path,
    engine: TorchEngine,
    examples: list[TrainExample],
    params: TrainParams,
    warmup: int,
    init: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """PEFT's own training of the same adapter (``init`` copied in), batches and loss."""
    from peft import LoraConfig, get_peft_model
    from torch.nn import functional as F
    from transformers import AutoModelForCausalLM

    device = engine.model.device
    dtype = next(engine.model.parameters()).dtype
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    config = LoraConfig(
        r=params.rank,
        lora_alpha=params.alpha,  # type: ignore[arg-type]  # PEFT takes any number
        target_modules=list(params.target_modules),
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    named = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in init.items():
            named[key.replace(".weight", ".default.weight")].copy_(value)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=params.learning_rate, weight_decay=params.weight_decay
    )
    pad = int(engine.tokenizer.pad_token_id or 0)
    losses: list[float] = []
    tokens = 0
    start = 0.0
    for index, chosen in enumerate(step_examples(len(examples), params)):
        if index == warmup:
            _sync(device)
            start = time.perf_counter()
        rows = [examples[i] for i in chosen]
        n_targets = sum(e.num_targets for e in rows)
        total = torch.zeros((), device=device)
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
                labels[r, :n] = torch.where(
                    torch.tensor(e.loss_mask), torch.tensor(e.input_ids), -100
                )
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = peft_model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            logits = logits[:, :-1].float()
            loss = (
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
                )
                / n_targets
            )
            loss.backward()  # type: ignore[no-untyped-call]
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))
        if index >= warmup:
            tokens += sum(len(e.input_ids) for e in rows)
    _sync(device)
    elapsed = time.perf_counter() - start
    plan = step_examples(len(examples), params)[warmup:]
    targets = sum(examples[i].num_targets for step in plan for i in step)
    return {
        "tokens_per_s": tokens / elapsed,
        "target_tokens_per_s": targets / elapsed,
        "seconds": elapsed,
        "losses": losses,
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": pick(0.5), "p99": pick(0.99), "max": ordered[-1], "n": len(ordered)}


def latency_run(
    engine: TorchEngine,
    trainer: LoraTrainer | None,
    *,
    preemption: bool,
    ratio: int,
    requests: int,
    prompt_words: int,
    max_tokens: int,
    arrivals_every: int,
) -> dict[str, Any]:
    """Requests arriving every ``arrivals_every`` loop iterations, driven to the end."""
    device = torch.device(engine.device)
    loop = Interleaver(engine, trainer, preemption_enabled=preemption, inference_ratio=ratio)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    prompts = [e.prompt or "" for e in synthetic_examples(requests, prompt_words, seed=7)]
    submitted: dict[str, float] = {}
    last: dict[str, float] = {}
    ttft: list[float] = []
    itl: list[float] = []
    micro_ms: list[float] = []
    iteration = 0
    while len(submitted) < requests or engine.has_work():
        if len(submitted) < requests and iteration % arrivals_every == 0:
            rid = f"q{len(submitted)}"
            loop.submit([GenerationRequest(rid, prompts[len(submitted)], sampling)])
            submitted[rid] = time.perf_counter()
        iteration += 1
        before = time.perf_counter()
        ran = loop.run_once()
        _sync(device)
        now = time.perf_counter()
        if ran.kind == "train":
            micro_ms.append((now - before) * 1000.0)
        for out in ran.outputs:
            if not out.token_ids:
                continue
            if out.request_id in last:
                itl.append((now - last[out.request_id]) * 1000.0)
            else:
                ttft.append((now - submitted[out.request_id]) * 1000.0)
            last[out.request_id] = now
    return {
        "ttft_ms": _percentiles(ttft),
        "itl_ms": _percentiles(itl),
        "micro_step_ms": _percentiles(micro_ms),
        "micro_steps": len(micro_ms),
    }


def run_train_bench(
    *,
    shape: str = "tiny",
    device: str | None = None,
    steps: int = 20,
    warmup: int = 2,
    rank: int = 16,
    batch_size: int = 8,
    example_words: int = 24,
    requests: int = 8,
    max_tokens: int = 32,
    max_micro_tokens: int = 256,
    inference_ratio: int = 10,
    workdir: Path | None = None,
    partial: Progress = lambda _: None,
) -> dict[str, Any]:
    """Both parts of the benchmark (module docstring); returns the JSON-ready result.
    ``partial`` gets the result so far after the training part and after each latency run."""
    if (device or "cpu") == "cpu" and not torch.cuda.is_available():
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_bench_model(Path(workdir or tmp) / f"bench-{shape}", shape=shape)
        engine = TorchEngine(
            model_dir, device=device, max_batch_size=max(requests, 4), max_adapters=4
        )
        raw = synthetic_examples(batch_size * (steps + warmup), example_words)
        examples = tokenize_examples(raw, engine.tokenizer, max_len=engine.max_model_len)
        longest = max(len(e.input_ids) for e in examples)
        params = TrainParams(
            rank=rank,
            alpha=2.0 * rank,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            batch_size=batch_size,
            learning_rate=1e-3,
            max_steps=steps + warmup,
            max_micro_tokens=batch_size * longest,
        )
        trainer = LoraTrainer(engine, engine.tokenizer, examples, params)
        peft = bench_peft(model_dir, engine, examples, params, warmup, trainer.adapter_tensors())
        ours = bench_vajra(trainer, examples, params, warmup)
        result: dict[str, Any] = {
            "bench": "train",
            "device": str(engine.device),
            "dtype": str(next(engine.model.parameters()).dtype),
            "shape": shape,
            "torch_threads": torch.get_num_threads(),
            "params": params.to_dict(),
            "training": {
                "steps_timed": steps,
                "vajra": ours,
                "peft": peft,
                "ratio": ours["tokens_per_s"] / peft["tokens_per_s"],
                "target_ratio": 1.0,
                "met": ours["tokens_per_s"] >= peft["tokens_per_s"],
            },
        }
        partial(result)
        job = TrainParams.from_dict(
            {
                **params.to_dict(),
                "max_steps": 0,
                "epochs": 1000,
                "max_micro_tokens": max_micro_tokens,
            }
        )
        bounded = [e for e in examples if len(e.input_ids) <= max_micro_tokens]
        latency: dict[str, Any] = {}
        for name, preemption, with_job in (
            ("no_job", True, False),
            ("preemption_on", True, True),
            ("preemption_off", False, True),
        ):
            job_trainer = LoraTrainer(engine, engine.tokenizer, bounded, job) if with_job else None
            latency[name] = latency_run(
                engine,
                job_trainer,
                preemption=preemption,
                ratio=inference_ratio,
                requests=requests,
                prompt_words=example_words,
                max_tokens=max_tokens,
                arrivals_every=max(1, max_tokens // 4),
            )
            if job_trainer is not None:
                job_trainer.close()
            partial({**result, "latency": latency})
        micro_max = latency["preemption_on"]["micro_step_ms"]["max"]
        bound = latency["no_job"]["itl_ms"]["p99"] + micro_max
        return {
            **result,
            "latency": {
                **latency,
                "inference_ratio": inference_ratio,
                "max_micro_tokens": max_micro_tokens,
                "target_p99_itl_ms": bound,
                "met": latency["preemption_on"]["itl_ms"]["p99"] <= bound,
            },
        }


def run_from_args(args: argparse.Namespace) -> int:
    quick = bool(args.quick)
    result = run_train_bench(
        shape=args.shape,
        device=args.device,
        steps=3 if quick else args.steps,
        warmup=1 if quick else 2,
        rank=args.rank,
        batch_size=4 if quick else args.batch_size,
        example_words=12 if quick else 24,
        requests=3 if quick else args.requests,
        max_tokens=8 if quick else args.max_tokens,
        max_micro_tokens=args.max_micro_tokens,
        inference_ratio=args.inference_ratio,
        partial=partial_writer(Path(args.json)),
    )
    if args.cluster:
        from vajra.bench.train_cluster import run_train_cluster_bench

        write_result(Path(args.json), result, partial=True)
        result["cluster"] = run_train_cluster_bench(
            requests=4 if quick else args.cluster_requests,
            concurrency=2 if quick else args.cluster_concurrency,
            max_tokens=8 if quick else args.max_tokens,
            rank=args.rank,
            inference_ratio=args.inference_ratio,
        )
    write_result(Path(args.json), result)
    summary = {
        "ratio": result["training"]["ratio"],
        "vajra_tokens_per_s": result["training"]["vajra"]["tokens_per_s"],
        "peft_tokens_per_s": result["training"]["peft"]["tokens_per_s"],
        **{
            name: result["latency"][name]["itl_ms"]
            for name in ("no_job", "preemption_on", "preemption_off")
        },
        "target_p99_itl_ms": result["latency"]["target_p99_itl_ms"],
    }
    if "cluster" in result:
        summary["cluster"] = {
            name: {k: result["cluster"][name][k] for k in ("ttft_ms", "itl_ms")}
            for name in ("no_job", "preemption_on", "preemption_off")
        }
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vajra.bench.train``: the benchmark without the CLI (what ``make gpu-check``
    runs on a machine that has no ZeroMQ)."""
    from vajra.bench.train_args import add_train_arguments

    parser = argparse.ArgumentParser(prog="python -m vajra.bench.train")
    add_train_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
