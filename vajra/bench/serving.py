"""``vajra bench serving``: generation throughput through the whole serving path, against a
static batch of transformers' ``generate`` on the same prompts, measured in one run.

On the tiny model (:mod:`vajra.gpu.tiny`), ``requests`` prompts of varied lengths:

* ``static``: one ``model.generate`` of every prompt padded together (left padding), greedy,
  ``min_new_tokens = max_new_tokens = max_tokens``, so every row yields ``max_tokens``;
* ``engine``: the executor's engine alone, loaded as an executor loads it (its configuration
  and its CPU threads), every request admitted in one step, stepped until done;
  ``engine_adapters``: the same with the requests spread over ``adapters`` adapters;
* a real cluster (the supervisor, every actor its own process, an embedded Valkey), driven by
  the async SDK (:class:`vajra.client.AsyncClient`) with every request in flight at once:

  - ``sdk_stream``: streams, on the fresh cluster (no adapter registered);
  - ``sdk_infer``: the same as whole answers;
  - ``sdk_stream_adapters_registered``: streams of the base model once ``adapters`` adapters
    are registered for the tenant;
  - ``sdk_stream_adapters``: streams spread over those adapters (request ``i`` uses adapter
    ``i % adapters``).

The model rarely meets EOS, so the SDK runs count the tokens actually produced. Each figure
is the best of ``rounds`` rounds (after a warm-up), with the median beside it. Every round of
``engine`` and of the SDK runs is paired with a round of the static batch run just before it,
so a machine whose load changes during the run still compares like with like: ``ratio`` is a
run's best tokens/s over the best of its paired static rounds (``static_tokens_per_s``).
``chunks_per_token``: stream messages per token (below 1 when tokens were coalesced);
``cpu_ms_per_round``: CPU time per round of each process of the cluster, of this one
(``load_generator``: the SDK) and of the executor's event loop alone (``executor_loop``).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import torch
import trio

from vajra.bench.bus import _cpu_seconds, _process_name, bench_cluster
from vajra.client import AsyncClient
from vajra.config import VajraConfig

#: Prompt stems; request ``i`` uses stem ``i % len`` repeated a little, so lengths vary.
_STEMS = (
    *("The river town woke slowly", "Once upon a time there was a station master who"),
    *("numbers: 1 2 3 4 5", "hello", "Why is the sky", "The quick brown fox jumps over it."),
    "A long and winding sentence about the weather in the mountains, which was",
    "Servers answer requests; models predict the next word;",
)


def bench_prompts(n: int) -> list[str]:
    """``n`` prompts of varied lengths (a few to a few dozen tokens)."""
    return [" ".join([_STEMS[i % len(_STEMS)]] * (1 + (i // len(_STEMS)) % 3)) for i in range(n)]


def _figure(seconds: list[float], tokens: int, static_tps: float | None) -> dict[str, Any]:
    best = min(seconds)
    out: dict[str, Any] = {
        "tokens": tokens,
        "seconds": round(best, 4),
        "tokens_per_s": round(tokens / best, 1),
        "median_tokens_per_s": round(tokens / statistics.median(seconds), 1),
        "rounds": len(seconds),
    }
    if static_tps:
        out["ratio"] = round(tokens / best / static_tps, 3)
        out["median_ratio"] = round(tokens / statistics.median(seconds) / static_tps, 3)
    return out


# --- transformers' static batch ---------------------------------------------------------------


class StaticBatch:
    """Every prompt in one left-padded ``generate``: exactly ``max_tokens`` new tokens per row."""

    def __init__(self, model_dir: Path, prompts: Sequence[str], max_tokens: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.eval()
        self.model = model
        self.batch = self.tok(list(prompts), return_tensors="pt", padding=True)
        self.max_tokens = max_tokens
        self._generate(2)  # warm-up
        self.seconds: list[float] = []

    def _generate(self, n: int) -> int:
        with torch.inference_mode():
            out = self.model.generate(
                **self.batch,
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=self.tok.pad_token_id,
            )
        return int((out.shape[1] - self.batch.input_ids.shape[1]) * out.shape[0])

    def round(self) -> float:
        """Run one batch; returns its tokens/s (also kept in :attr:`seconds`)."""
        start = time.perf_counter()
        tokens = self._generate(self.max_tokens)
        self.seconds.append(time.perf_counter() - start)
        return tokens / self.seconds[-1]


class _Pairing:
    """The static rounds run alongside one measurement, for its ratio."""

    def __init__(self, static: StaticBatch) -> None:
        self.static = static
        self.tps: list[float] = []

    def round(self) -> None:
        self.tps.append(self.static.round())

    def figure(self, seconds: list[float], tokens: int) -> dict[str, Any]:
        best_static = max(self.tps)
        out = _figure(seconds, tokens, best_static)
        out["static_tokens_per_s"] = round(best_static, 1)
        return out


# --- the engine alone -------------------------------------------------------------------------


def _executor_engine(model_dir: Path) -> tuple[Any, int]:
    """The engine as an executor loads it, and the CPU threads it set for it (the static
    batch keeps torch's default: this restores it)."""
    from vajra.actors.executor import Executor

    default = torch.get_num_threads()
    executor = Executor(VajraConfig(), None, executor_id="bench", model=str(model_dir))
    try:
        engine = executor._load_engine()  # exactly the executor's own configuration
        return engine, torch.get_num_threads()
    finally:
        for sock in (executor.work_in, executor.replies, executor.ledger):
            sock.close()
        torch.set_num_threads(default)


def run_engine(
    model_dir: Path,
    prompts: Sequence[str],
    max_tokens: int,
    rounds: int,
    static: StaticBatch,
    adapters: Sequence[tuple[bytes, bytes]] = (),
) -> dict[str, Any]:
    """The executor's engine, every request admitted at once and stepped until done; with
    ``adapters`` (config, weights) loaded into its slots, request ``i`` uses adapter ``i % n``."""
    from vajra.gpu.interface import GenerationRequest
    from vajra.policies.decoding import SamplingParams

    engine, threads = _executor_engine(model_dir)
    slots: list[int | None] = [None]
    if adapters:
        slots = _load_adapters(engine, model_dir, adapters)

    def one_round(tag: str, n: int) -> tuple[int, float, int]:
        admit = [
            GenerationRequest(f"{tag}-{i}", p, SamplingParams(max_tokens=n), slots[i % len(slots)])
            for i, p in enumerate(prompts)
        ]
        default = torch.get_num_threads()
        torch.set_num_threads(threads)
        start = time.perf_counter()
        tokens = steps = 0
        outputs = engine.step(admit, [])
        while True:
            steps += 1
            tokens += sum(len(o.token_ids) for o in outputs)
            if not engine.has_work():
                break
            outputs = engine.step([], [])
        seconds = time.perf_counter() - start
        torch.set_num_threads(default)
        return tokens, seconds, steps

    one_round("warm", 2)
    pairing = _Pairing(static)
    times, tokens, steps = [], 0, 0
    for r in range(rounds):
        pairing.round()
        tokens, seconds, steps = one_round(f"r{r}", max_tokens)
        times.append(seconds)
    return {**pairing.figure(times, tokens), "steps": steps, "torch_threads": threads}


def _load_adapters(
    engine: Any, model_dir: Path, adapters: Sequence[tuple[bytes, bytes]]
) -> list[int | None]:
    """Load each (config, weights) into a slot of ``engine.adapters``, as the tiers would."""
    from vajra.adapters.format import base_model_spec, validate_adapter
    from vajra.gpu.lora import pack_adapter, read_adapter_tensors

    residency = engine.adapters
    spec = base_model_spec(model_dir)
    slots: list[int | None] = []
    for config_json, weights in adapters:
        manifest = validate_adapter(config_json, weights, spec, max_rank=256, max_bytes=1 << 30)
        host = pack_adapter(
            manifest, read_adapter_tensors(weights), residency.layout, dtype=residency.dtype
        )
        slots.append(residency.load(host))
    return slots


def _cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of this process and each under it, and ``executor_loop``: the
    executor's main thread alone, its event loop (its other threads run the model)."""
    used = _cpu_seconds()
    for child in psutil.Process().children(recursive=True):
        try:
            if _process_name(child) == "executor":
                main = next(t for t in child.threads() if t.id == child.pid)
                used["executor_loop"] = main.user_time + main.system_time  # one executor
        except (psutil.Error, StopIteration):
            continue
    return used


# --- through the SDK --------------------------------------------------------------------------


async def _sdk_round(
    client: AsyncClient,
    prompts: Sequence[str],
    max_tokens: int,
    adapters: Sequence[str | None],
    *,
    stream: bool,
) -> dict[str, float]:
    """Every prompt in flight at once; tokens produced, seconds, messages, first-token times."""
    tokens = chunks = 0
    first: list[float] = []
    start = time.perf_counter()

    async def one(i: int, prompt: str) -> None:
        nonlocal tokens, chunks
        adapter = adapters[i % len(adapters)]
        if not stream:
            result = await client.infer(prompt, adapter=adapter, max_tokens=max_tokens)
            tokens += len(result.tokens)
            chunks += 1
            return
        seen_first = False
        async with client.stream(prompt, adapter=adapter, max_tokens=max_tokens) as replies:
            async for chunk in replies:
                chunks += 1
                tokens += len(chunk.token_ids)
                if chunk.token_ids and not seen_first:
                    seen_first = True
                    first.append(time.perf_counter() - start)

    async with trio.open_nursery() as nursery:
        for i, prompt in enumerate(prompts):
            nursery.start_soon(one, i, prompt)
    seconds = time.perf_counter() - start
    first.sort()
    return {
        "tokens": tokens,
        "seconds": seconds,
        "chunks": chunks,
        "first_token_p50_s": first[len(first) // 2] if first else 0.0,
    }


async def _sdk_scenario(
    client: AsyncClient,
    prompts: Sequence[str],
    max_tokens: int,
    rounds: int,
    adapters: Sequence[str | None],
    static: StaticBatch,
    *,
    stream: bool,
) -> dict[str, Any]:
    await _sdk_round(client, prompts, 2, adapters, stream=stream)  # warm-up (adapters load)
    pairing = _Pairing(static)
    runs = []
    cpu_used: dict[str, float] = {}
    for _ in range(rounds):
        pairing.round()
        cpu_before = _cpu_by_process()
        runs.append(await _sdk_round(client, prompts, max_tokens, adapters, stream=stream))
        for name, t in _cpu_by_process().items():
            cpu_used[name] = cpu_used.get(name, 0.0) + t - cpu_before.get(name, 0.0)
    best = min(runs, key=lambda r: r["seconds"] / max(1.0, r["tokens"]))
    seconds = [r["seconds"] * best["tokens"] / max(1.0, r["tokens"]) for r in runs]
    out = pairing.figure(seconds, int(best["tokens"]))
    out["chunks_per_token"] = round(best["chunks"] / max(1.0, best["tokens"]), 3)
    if stream:
        out["first_token_p50_ms"] = round(best["first_token_p50_s"] * 1000, 1)
    # CPU milliseconds per round of each process (``load_generator``: this one, the SDK's).
    used = {name: t * 1000 / rounds for name, t in cpu_used.items()}
    out["cpu_ms_per_round"] = {n: round(ms, 1) for n, ms in sorted(used.items()) if ms >= 0.5}
    return out


def bench_adapters(model_dir: Path, n: int) -> list[tuple[bytes, bytes]]:
    """``n`` random rank-8 LoRA adapters on q/v for the model, as (config, weights) bytes."""
    from vajra.adapters.format import base_model_spec
    from vajra.bench.lora_models import random_adapter

    spec = base_model_spec(model_dir)
    made = [
        random_adapter(spec, rank=8, alpha=16.0, targets=("q_proj", "v_proj"), seed=i)
        for i in range(n)
    ]
    return [(a.config_json, a.weights) for a in made]


async def _drive_cluster(
    address: str,
    api_key: str,
    model_dir: Path,
    prompts: Sequence[str],
    max_tokens: int,
    rounds: int,
    n_adapters: int,
    static: StaticBatch,
) -> dict[str, Any]:
    async with AsyncClient(address, api_key, timeout_s=600) as client:
        await client.ping()

        async def run(adapters: Sequence[str | None], stream: bool = True) -> dict[str, Any]:
            return await _sdk_scenario(
                client, prompts, max_tokens, rounds, adapters, static, stream=stream
            )

        results = {"sdk_stream": await run([None]), "sdk_infer": await run([None], False)}
        pushed = bench_adapters(model_dir, n_adapters)
        names: list[str | None] = [
            (await client.push_adapter_bytes(config, weights, f"bench-{i}")).name
            for i, (config, weights) in enumerate(pushed)
        ]
        results["sdk_stream_adapters_registered"] = await run([None])
        results["sdk_stream_adapters"] = await run(names)
    return results


def run_serving_bench(
    *,
    quick: bool = False,
    requests: int = 32,
    max_tokens: int = 128,
    rounds: int = 3,
    adapters: int = 4,
) -> dict[str, Any]:
    """Every measurement of the module docstring, as a JSON-ready dict. ``quick``: 16 new
    tokens, one round, two adapters (checks that it runs; its figures mean little)."""
    if quick:
        max_tokens, rounds, adapters = min(max_tokens, 16), 1, min(adapters, 2)
    prompts = bench_prompts(requests)
    with tempfile.TemporaryDirectory(prefix="vajra-bench-serving-") as tmp:
        from vajra.gpu.tiny import init_tiny_model

        model_dir = init_tiny_model(Path(tmp) / "tiny")
        static = StaticBatch(model_dir, prompts, max_tokens)
        engine = run_engine(model_dir, prompts, max_tokens, rounds, static)
        engine_adapters = run_engine(
            model_dir, prompts, max_tokens, rounds, static, bench_adapters(model_dir, adapters)
        )
        home = Path(tmp) / "home"
        home.mkdir()
        with bench_cluster(home, model=str(model_dir)) as (address, api_key):
            sdk = trio.run(
                _drive_cluster,
                address,
                api_key,
                model_dir,
                prompts,
                max_tokens,
                rounds,
                adapters,
                static,
            )

    return {
        "benchmark": "serving",
        "path": "AsyncClient -> gateway -> scheduler -> executor(tiny model) -> gateway -> client",
        "static": _figure(static.seconds, requests * max_tokens, None),
        "engine": engine,
        "engine_adapters": engine_adapters,
        **sdk,
        "conditions": {
            "requests": requests,
            "max_tokens": max_tokens,
            "rounds": rounds,
            "adapters": adapters,
            "quick": quick,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "static_torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
