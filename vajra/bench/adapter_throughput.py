"""Multi-adapter decode throughput: Vajra's LoRA path against base-only and against PEFT.

With 1, 8, 32, 128, 512 distinct adapters in the batch, against the same model base-only and
against PEFT's mixed-batch inference (``generate(..., adapter_names=[...])`` on a ``PeftModel``
holding every adapter), all on one model in one run. All three run through ``transformers``'
``generate`` (greedy, a fixed number of new tokens), so only the LoRA path differs. A batch
has ``max(batch_size, adapters)`` rows, row ``i`` using adapter ``i % adapters``; base-only is
measured at each row count too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from vajra.bench.lora_models import (
    SHAPES,
    BenchAdapter,
    random_adapter,
    random_model,
    spec_for,
    sync_device,
)
from vajra.bench.result_file import Progress
from vajra.gpu.lora import (
    LoraBatchState,
    LoraPool,
    inject_lora,
    pack_adapter,
    read_adapter_tensors,
    remove_lora,
)


def _generate(
    model: Any, input_ids: torch.Tensor, new_tokens: int, repeats: int = 1, **kwargs: Any
) -> float:
    """Best seconds over ``repeats`` greedy ``generate`` calls of exactly ``new_tokens`` tokens
    per row, after one untimed warm-up call of the same length. (A 2-token warm-up left the
    allocator's growth and each new length's kernels to the first timed call: on an H200,
    with one timed call, base-only came out at a third of its speed, 2026-11-28.)"""
    times = []
    for i in range(repeats + 1):
        sync_device(input_ids.device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
                **kwargs,
            )
        sync_device(input_ids.device)
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def measure_throughput(
    *,
    shape: str,
    device: torch.device,
    dtype: torch.dtype,
    counts: Sequence[int] = (1, 8, 32, 128, 512),
    batch_size: int = 32,
    prompt_tokens: int = 16,
    new_tokens: int = 16,
    rank: int = 16,
    peft: bool = True,
    peft_max_adapters: int | None = None,
    modes: Sequence[str] = ("auto",),
    repeats: int = 2,
    log: Callable[[str], None] = lambda _: None,
    progress: Progress = lambda _: None,
) -> dict[str, Any]:
    """Decode throughput by adapter count (module docstring); ``progress`` gets the result so
    far after each count of each system, so a run cut short keeps what it measured."""
    model = random_model(shape, device, dtype)
    spec = spec_for(shape)
    n_max = max(counts)
    adapters = [random_adapter(spec, rank=rank, alpha=2 * rank, seed=i + 1) for i in range(n_max)]
    log(f"built {n_max} adapters of rank {rank}")

    pool = LoraPool.for_model(model, max_vram_adapters=n_max, max_rank=rank, mean_rank=rank)
    state = LoraBatchState(pool, max_rows=max(batch_size, n_max))
    inject_lora(model, state)
    slots = [
        pool.load(
            pack_adapter(a.manifest, read_adapter_tensors(a.weights), pool.layout, dtype=dtype)
        )
        for a in adapters
    ]
    gen = torch.Generator().manual_seed(0)
    vocab = SHAPES[shape]["vocab_size"]

    def prompts(rows: int) -> torch.Tensor:
        return torch.randint(3, vocab, (rows, prompt_tokens), generator=gen).to(device)

    rows_per_count = {n: max(batch_size, n) for n in counts}
    results: list[dict[str, Any]] = []
    report = {
        "model_shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "rank": rank,
        "batch_size": batch_size,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "results": results,
    }
    base_cache: dict[int, float] = {}
    for n in counts:
        rows = rows_per_count[n]
        ids = prompts(rows)
        entry: dict[str, Any] = {"adapters": n, "rows": rows}
        if rows not in base_cache:
            base_cache[rows] = rows * new_tokens / _generate(model, ids, new_tokens, repeats)
        entry["base_tok_s"] = round(base_cache[rows], 2)
        row_slots: list[int | None] = [slots[i % n] for i in range(rows)]
        for mode in modes:
            state.mode = mode  # type: ignore[assignment]
            with state.rows(row_slots):
                seconds = _generate(model, ids, new_tokens, repeats)
            key = "vajra_tok_s" if mode == "auto" else f"vajra_{mode}_tok_s"
            entry[key] = round(rows * new_tokens / seconds, 2)
        state.mode = "auto"
        if "vajra_tok_s" in entry:
            entry["vajra_vs_base"] = round(entry["vajra_tok_s"] / entry["base_tok_s"], 3)
        results.append(entry)
        log(f"vajra: {entry}")
        progress(report)
    remove_lora(model)
    del pool, state

    # PEFT loads adapters one by one (slow at 128 on a GPU): compared up to peft_max_adapters.
    peft_counts = [n for n in counts if peft_max_adapters is None or n <= peft_max_adapters]
    if peft and peft_counts:
        compared = [r for r in results if r["adapters"] in peft_counts]
        _peft_throughput(
            model, adapters[: max(peft_counts)], peft_counts, rows_per_count, prompts,
            new_tokens, repeats, compared, log, lambda: progress(report),
        )  # fmt: skip
    return report


def _peft_throughput(
    model: Any,
    adapters: Sequence[BenchAdapter],
    counts: Sequence[int],
    rows_per_count: Mapping[int, int],
    prompts: Callable[[int], torch.Tensor],
    new_tokens: int,
    repeats: int,
    results: list[dict[str, Any]],
    log: Callable[[str], None],
    done_one: Callable[[], None],
) -> None:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = json.loads(adapters[0].config_json)
    lora = LoraConfig(
        r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"]
    )
    peft_model: Any = get_peft_model(model, lora, adapter_name="a0")
    for i, adapter in enumerate(adapters):
        if i:
            peft_model.add_adapter(f"a{i}", lora)
        tensors = read_adapter_tensors(adapter.weights)
        set_peft_model_state_dict(peft_model, tensors, adapter_name=f"a{i}")
    peft_model.eval()
    log(f"peft: loaded {len(adapters)} adapters")
    for entry, n in zip(results, counts, strict=True):
        rows = rows_per_count[n]
        names = [f"a{i % n}" for i in range(rows)]
        seconds = _generate(peft_model, prompts(rows), new_tokens, repeats, adapter_names=names)
        entry["peft_tok_s"] = round(rows * new_tokens / seconds, 2)
        entry["vajra_vs_peft"] = round(entry.get("vajra_tok_s", 0.0) / entry["peft_tok_s"], 3)
        log(f"peft: {entry}")
        done_one()
    peft_model.unload()
