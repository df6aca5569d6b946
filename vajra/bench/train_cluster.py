"""``vajra bench train --cluster``: what a training job costs inference on a real cluster.

The in-process part of ``vajra bench train`` drives the model thread's
:class:`~vajra.gpu.training.Interleaver` directly. This section measures the same thing
through the whole serving path: a cluster started by the supervisor (every actor its own
process, an embedded Valkey, the tiny model), driven by the async SDK
(:class:`vajra.client.AsyncClient`). ``concurrency`` streams are kept in flight until
``requests`` streams have finished, each of ``max_tokens`` tokens (EOS ignored), and for each
stream the time to its first token (TTFT) and the gaps between its chunks (ITL) are taken on
the client's clock. Three runs:

- ``no_job``: nothing trains;
- ``preemption_on``: a job trains (submitted through the SDK, a fresh rank-``rank`` adapter on
  q/k/v/o over synthetic text, far more steps than the run lasts) with
  ``policies.training_preemption_enabled = true``: inference first, one micro-step after
  ``training.inference_ratio`` inference steps in a row;
- ``preemption_off``: the cluster restarted with ``training_preemption_enabled = false``
  (inference steps and micro-steps alternate), the same job.

Each run records the optimizer steps the job made while it was measured
(``train_steps``), so a run where training was starved shows it. The job is cancelled after
each run. ``chunks_per_token`` below 1 means tokens were coalesced into fewer stream chunks (a
chunk's gap then spans several tokens). Nothing here asserts a speed; on the CPU the figures
depend on the machine's other load.

Errors: a cluster that does not start raises RuntimeError; a failed request raises the SDK's
error (the benchmark does not hide failures). Cancellation (Ctrl-C) stops the cluster.
"""

from __future__ import annotations

import functools
import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from vajra.bench.bus import _run_cluster_in_thread
from vajra.bench.train import _percentiles, synthetic_examples
from vajra.client import AsyncClient
from vajra.config import VajraConfig
from vajra.state import ClusterState

#: The job's synthetic examples: enough that it runs far longer than any measured run.
_JOB_EXAMPLES = 64
_JOB_WORDS = 24
#: How long to wait for the job to start training before a measured run.
_JOB_START_S = 120.0


def _start_cluster(
    home: Path, model_dir: Path, *, preemption: bool, inference_ratio: int
) -> tuple[dict[str, Any], trio.lowlevel.TrioToken, threading.Thread]:
    """The serving benchmark's one-executor cluster, with training preemption and the ratio set."""

    def tune(cfg: VajraConfig) -> VajraConfig:
        return cfg.replace("policies", training_preemption_enabled=preemption).replace(
            "training", inference_ratio=inference_ratio, progress_poll_s=0.1
        )

    return _run_cluster_in_thread(home, model=str(model_dir), tune=tune, start_timeout_s=180)


async def _stream_load(
    client: AsyncClient, prompts: list[str], *, requests: int, concurrency: int, max_tokens: int
) -> dict[str, Any]:
    """``requests`` streams, ``concurrency`` at a time; TTFT and inter-chunk gaps in ms."""
    ttft: list[float] = []
    itl: list[float] = []
    counts = {"tokens": 0, "chunks": 0}
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            start = last = time.perf_counter()
            first = True
            async with client.stream(
                prompts[i % len(prompts)], max_tokens=max_tokens, ignore_eos=True
            ) as chunks:
                async for chunk in chunks:
                    if not chunk.token_ids:
                        continue
                    now = time.perf_counter()
                    (ttft if first else itl).append((now - (start if first else last)) * 1000.0)
                    first, last = False, now
                    counts["tokens"] += len(chunk.token_ids)
                    counts["chunks"] += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    seconds = time.perf_counter() - t0
    return {
        "ttft_ms": _percentiles(ttft),
        "itl_ms": _percentiles(itl),
        "requests": requests,
        "tokens": counts["tokens"],
        "tokens_per_s": counts["tokens"] / seconds,
        "chunks_per_token": counts["chunks"] / max(1, counts["tokens"]),
        "seconds": seconds,
    }


async def _measure(
    address: str, api_key: str, *, runs: list[str], rank: int, load: dict[str, Any]
) -> dict[str, Any]:
    """On one cluster: each of ``runs`` ("no_job" first, then the one with a job)."""
    out: dict[str, Any] = {}
    prompts = [e.prompt or "" for e in synthetic_examples(16, 12, seed=7)]
    rows = [{"text": e.prompt} for e in synthetic_examples(_JOB_EXAMPLES, _JOB_WORDS, seed=3)]
    dataset = "".join(json.dumps(r) + "\n" for r in rows).encode()
    async with AsyncClient(address, api_key, timeout_s=600) as client:
        await client.ping()
        await _stream_load(client, prompts, **{**load, "requests": load["concurrency"]})  # warm
        for name in runs:
            if name == "no_job":
                out[name] = await _stream_load(client, prompts, **load)
                continue
            job = await client.train(
                "bench-job",
                dataset,
                fresh=True,
                rank=rank,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                epochs=100,
                batch_size=8,
                learning_rate=1e-4,
                max_micro_tokens=256,
                checkpoint_every=0,
            )
            with trio.fail_after(_JOB_START_S):
                while (started := await job.status()).step < 1:  # noqa: ASYNC110
                    await trio.sleep(0.1)
            before = started.step
            out[name] = await _stream_load(client, prompts, **load)
            after = await job.status()
            out[name]["train_steps"] = after.step - before
            out[name]["train_steps_per_s"] = (after.step - before) / out[name]["seconds"]
            await job.cancel()
            await job.wait(timeout_s=60)
    return out


def run_train_cluster_bench(
    *,
    requests: int = 128,
    concurrency: int = 4,
    max_tokens: int = 32,
    rank: int = 16,
    inference_ratio: int = 10,
) -> dict[str, Any]:
    """The three runs of the module docstring on two fresh clusters; the JSON-ready result."""
    from vajra.gpu.tiny import init_tiny_model

    load = {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens}
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vajra-bench-train-cluster-") as tmp:
        model_dir = init_tiny_model(Path(tmp) / "tiny")
        for preemption, runs in ((True, ["no_job", "preemption_on"]), (False, ["preemption_off"])):
            home = Path(tmp) / f"home-{int(preemption)}"
            home.mkdir()
            ready, token, thread = _start_cluster(
                home, model_dir, preemption=preemption, inference_ratio=inference_ratio
            )
            try:
                with ClusterState(ready["info"]["redis_url"]) as state:
                    _, api_key = state.tenants.create(f"bench-{uuid.uuid4().hex[:8]}")
                measure = functools.partial(
                    _measure, ready["info"]["gateway_address"], api_key, runs=runs, rank=rank
                )
                figures = trio.run(functools.partial(measure, load=load))
            finally:
                trio.from_thread.run_sync(ready["stop"].set, trio_token=token)
                thread.join(60)
            result.update(figures)
    return {
        "path": "AsyncClient -> gateway -> scheduler -> executor(tiny model) -> gateway -> client",
        "model": "tiny",
        **result,
        "conditions": {**load, "rank": rank, "inference_ratio": inference_ratio},
    }
