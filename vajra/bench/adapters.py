"""``vajra bench adapters``: adapter activation latency and multi-adapter decode throughput.

(a) **Activation**: the time to bring one adapter of a given shape into a pool slot, per tier.
    Built in: ``pinned`` (an adapter already packed in (pinned) host memory: one copy) and
    ``page_cache`` (a PEFT ``adapter_model.safetensors`` file just written, so in the OS page
    cache: read, validate, pack, copy). Other tiers (disk, object store) plug in through
    ``tiers=``: a :data:`TierFactory` receives the adapter's files and returns a loader that
    fetches it from that tier and returns a :class:`~vajra.gpu.lora.HostAdapter`.
(b) **Decode throughput** with 1, 8, 32, 128, 512 distinct adapters in the batch, against the
    same model base-only and against PEFT's mixed-batch inference (``generate(...,
    adapter_names=[...])`` on a ``PeftModel`` holding every adapter), all on one model in one
    run. All three run through ``transformers``' ``generate`` (greedy, a fixed number of new
    tokens), so only the LoRA path differs. A batch has ``max(batch_size, adapters)`` rows, row
    ``i`` using adapter ``i % adapters``; base-only is measured at each row count too.

Dependency-light on purpose: torch, transformers, peft and safetensors only (no trio, zmq or
redis), so ``python -m vajra.bench.adapters --json out.json`` runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from transformers import LlamaConfig, LlamaForCausalLM

from vajra.adapters.format import (
    AdapterManifest,
    BaseModelSpec,
    validate_adapter,
)
from vajra.gpu.lora import (
    LLAMA_TARGET_MODULES,
    HostAdapter,
    LoraBatchState,
    LoraLayout,
    LoraPool,
    inject_lora,
    pack_adapter,
    read_adapter_tensors,
    remove_lora,
)

#: (config json, safetensors weights, base spec, pool layout) -> a loader for one tier.
TierFactory = Callable[[bytes, bytes, BaseModelSpec, LoraLayout], Callable[[], HostAdapter]]

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {  # vajra.gpu.tiny's shape
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "small": {  # CPU default: big enough that LoRA work is not lost in Python overhead
        "vocab_size": 4096,
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    "llama-3.2-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
    "llama-3-8b": {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    },
}


@dataclass(frozen=True)
class BenchAdapter:
    config_json: bytes
    weights: bytes
    manifest: AdapterManifest


def llama_config(shape: str) -> LlamaConfig:
    dims: dict[str, Any] = dict(SHAPES[shape])
    return LlamaConfig(
        **dims,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def spec_for(shape: str) -> BaseModelSpec:
    """The linear modules of a Llama of ``shape``, computed without building it."""
    cfg = SHAPES[shape]
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    kv = hidden // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    modules: dict[str, tuple[int, int]] = {}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape_ in (
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.k_proj", (hidden, kv)),
            ("self_attn.v_proj", (hidden, kv)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (hidden, inter)),
            ("mlp.up_proj", (hidden, inter)),
            ("mlp.down_proj", (inter, hidden)),
        ):
            modules[f"model.layers.{i}.{name}"] = shape_
    modules["lm_head"] = (hidden, cfg["vocab_size"])
    return BaseModelSpec(model_type="llama", modules=modules)


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    torch.manual_seed(0)
    with torch.device(device):
        model: Any = LlamaForCausalLM(llama_config(shape))
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def random_adapter(
    spec: BaseModelSpec,
    *,
    rank: int,
    alpha: float,
    targets: Sequence[str] = LLAMA_TARGET_MODULES,
    seed: int,
    max_rank: int = 256,
) -> BenchAdapter:
    """A LoRA adapter in PEFT's on-disk format (config + safetensors), validated by Vajra."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (in_f, out_f) in spec.modules.items():
        if module.rsplit(".", 1)[-1] in targets:
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) / rank
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": list(targets),
        "bias": "none",
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
    }
    config_json = json.dumps(config).encode()
    weights = save_safetensors(tensors)
    manifest = validate_adapter(config_json, weights, spec, max_rank=max_rank, max_bytes=1 << 34)
    return BenchAdapter(config_json, weights, manifest)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 4),
        "p90_ms": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4),
        "mean_ms": round(statistics.fmean(ordered), 4),
        "samples": len(ordered),
    }


# ---------------------------------------------------------------------- (a) activation


def pinned_tier(
    config_json: bytes, weights: bytes, spec: BaseModelSpec, layout: LoraLayout
) -> Callable[[], HostAdapter]:
    """Already packed in (pinned) host memory: activation is the copy alone."""
    manifest = validate_adapter(config_json, weights, spec, max_rank=1 << 16, max_bytes=1 << 40)
    host = pack_adapter(manifest, read_adapter_tensors(weights), layout)
    return lambda: host


def page_cache_tier(
    config_json: bytes, weights: bytes, spec: BaseModelSpec, layout: LoraLayout
) -> Callable[[], HostAdapter]:
    """A PEFT directory whose files are in the OS page cache: read, validate, pack, copy."""
    directory = Path(tempfile.mkdtemp(prefix="vajra-bench-"))
    (directory / "adapter_config.json").write_bytes(config_json)
    (directory / "adapter_model.safetensors").write_bytes(weights)

    def load() -> HostAdapter:
        config = (directory / "adapter_config.json").read_bytes()
        data = (directory / "adapter_model.safetensors").read_bytes()
        manifest = validate_adapter(config, data, spec, max_rank=1 << 16, max_bytes=1 << 40)
        return pack_adapter(manifest, read_adapter_tensors(data), layout)

    return load


BUILTIN_TIERS: dict[str, TierFactory] = {"pinned": pinned_tier, "page_cache": page_cache_tier}


def measure_activation(
    *,
    shape: str = "llama-3-8b",
    rank: int = 16,
    device: torch.device,
    dtype: torch.dtype,
    tiers: Mapping[str, TierFactory] | None = None,
    repeats: int = 20,
) -> dict[str, Any]:
    """Median/p90 time from "adapter in tier X" to "adapter usable in a pool slot"."""
    spec = spec_for(shape)
    layout = LoraLayout.from_spec(spec)
    pool = LoraPool(layout, device=device, dtype=dtype, rank_classes=(rank,), slots_per_class=(2,))
    adapter = random_adapter(spec, rank=rank, alpha=2 * rank, seed=0)
    out: dict[str, Any] = {
        "shape": shape,
        "rank": rank,
        "dtype": str(dtype).removeprefix("torch."),
        "safetensors_bytes": len(adapter.weights),
        "slot_bytes": pool.capacity_bytes // 2,
        "tiers": {},
    }
    for name, factory in {**BUILTIN_TIERS, **(tiers or {})}.items():
        loader = factory(adapter.config_json, adapter.weights, spec, layout)
        if name == "pinned":
            out["pinned_host_memory"] = bool(loader().buffer.is_pinned())
        samples: list[float] = []
        for i in range(repeats + 2):
            _sync(device)
            start = time.perf_counter()
            slot = pool.load(loader())
            pool.synchronize()
            elapsed = (time.perf_counter() - start) * 1000.0
            pool.free(slot)
            if i >= 2:  # warm-up
                samples.append(elapsed)
        out["tiers"][name] = _percentiles(samples)
    del pool
    return out


# ---------------------------------------------------------------------- (b) throughput


def _generate(
    model: Any, input_ids: torch.Tensor, new_tokens: int, repeats: int = 1, **kwargs: Any
) -> float:
    """Best seconds over ``repeats`` greedy ``generate`` calls of exactly ``new_tokens`` tokens
    per row, after one untimed warm-up call at the same shape."""
    times = []
    for i in range(repeats + 1):
        _sync(input_ids.device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=new_tokens if i else 2,
                min_new_tokens=new_tokens if i else 2,
                pad_token_id=0,
                **kwargs,
            )
        _sync(input_ids.device)
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
    modes: Sequence[str] = ("auto",),
    repeats: int = 2,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    model = random_model(shape, device, dtype)
    spec = spec_for(shape)
    n_max = max(counts)
    adapters = [random_adapter(spec, rank=rank, alpha=2 * rank, seed=i + 1) for i in range(n_max)]
    log(f"built {n_max} adapters of rank {rank}")

    pool = LoraPool.for_model(model, rank_classes=(rank,), slots_per_class=(n_max,))
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
    remove_lora(model)
    del pool, state

    if peft:
        _peft_throughput(
            model, adapters, counts, rows_per_count, prompts, new_tokens, repeats, results, log
        )
    return {
        "model_shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "rank": rank,
        "batch_size": batch_size,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "results": results,
    }


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
    peft_model.unload()


def run_adapters_bench(
    *,
    device: str | None = None,
    model_shape: str | None = None,
    counts: Sequence[int] = (1, 8, 32, 128, 512),
    batch_size: int | None = None,
    new_tokens: int | None = None,
    rank: int = 16,
    peft: bool = True,
    modes: Sequence[str] = ("auto",),
    activation_shape: str | None = None,
    activation_repeats: int | None = None,
    repeats: int | None = None,
    tiers: Mapping[str, TierFactory] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Run (a) and (b). Defaults on CUDA: a Llama-3.2-1B-shaped random model in bfloat16, batch
    32, 64 new tokens, best of 3, activation of a Llama-3-8B-shaped adapter. On the CPU (to
    finish in a few minutes on 2 cores): the "tiny" shape in float32, batch 32, 8 new tokens,
    one timed run after a warm-up, activation of a "tiny"-shaped adapter."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = target.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = model_shape or ("llama-3.2-1b" if cuda else "tiny")
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(target) if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    started = time.perf_counter()
    result["activation"] = measure_activation(
        shape=activation_shape or ("llama-3-8b" if cuda else shape),
        rank=rank,
        device=target,
        dtype=dtype,
        tiers=tiers,
        repeats=activation_repeats or (20 if cuda else 10),
    )
    log(f"activation: {result['activation']}")
    result["throughput"] = measure_throughput(
        shape=shape,
        device=target,
        dtype=dtype,
        counts=counts,
        batch_size=batch_size or 32,
        new_tokens=new_tokens or (64 if cuda else 8),
        repeats=repeats or (3 if cuda else 1),
        rank=rank,
        peft=peft,
        modes=modes,
        log=log,
    )
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vajra.bench.adapters", description=__doc__)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--device", default=None)
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--counts", default="1,8,32,128,512")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument(
        "--kernels", action="store_true", help="also time the gather and segmented paths alone"
    )
    parser.add_argument("--activation-shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--activation-repeats", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (best is kept)")
    args = parser.parse_args(argv)
    result = run_adapters_bench(
        device=args.device,
        model_shape=args.model_shape,
        counts=[int(c) for c in args.counts.split(",")],
        batch_size=args.batch_size,
        new_tokens=args.new_tokens,
        rank=args.rank,
        peft=not args.no_peft,
        modes=("auto", "gather", "segmented") if args.kernels else ("auto",),
        activation_shape=args.activation_shape,
        activation_repeats=args.activation_repeats,
        repeats=args.repeats,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
