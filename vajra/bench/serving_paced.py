"""``vajra bench paced``: the serving path's own latency and CPU, one request at a time, with
idle gaps between requests as in a sparse trace.

Why: the simulator adds ``costs.serving_ms`` (the serving path's latency outside the engine)
to each request's time to first token. ``vajra bench serving`` sends requests back to back,
so every process is busy and warm; a sparse trace (a replay at ~23 requests/s, a mean gap of
~43 ms) finds every process idle when a request arrives, and its first token comes a few
milliseconds later. This benchmark measures that idle penalty, with back-to-back figures
beside it, and the CPU that the processes other than the executor spend per request (for the
simulator's host-CPU contention model).

On the tiny model (:mod:`vajra.gpu.tiny`), every request is a prompt of ``prompt_tokens``
words (as a trace replay builds it), ``max_tokens`` new tokens with ``ignore_eos``, on a
LoRA adapter (random rank 8 on q/v). The JSON's fields:

* ``engine_adapters``: the executor's engine alone, loaded as an executor loads it (its
  configuration and CPU threads), one adapter in its slots, one request stepped until done;
  after a warm-up, ``rounds`` rounds. ``seconds``: the median round; ``steps``: engine steps
  per round; ``first_step_ms``: the median time of the first ``step`` (admission and
  prefill); ``step_ms``: ``seconds / steps`` in ms; ``torch_threads``; ``rounds``.
* ``paced``: a real cluster (the supervisor, every actor its own process, an embedded
  Valkey, one executor) driven by the async SDK. ``adapters`` adapters are pushed and each
  served once (a warm-up, so no measured request is a cold load); the process CPU is then
  measured over an idle sleep of 2 s; then ``requests`` streams run one at a time, request
  ``i`` on adapter ``i % adapters``, each sent ``gap_ms`` after the previous one finished.
  ``first_token_ms`` / ``e2e_ms``: {p50, p90, p99, max, mean, n} from sending to the first
  token / to the end of the stream; ``gap_ms``; ``seconds``: the measured pass's wall time
  (gaps included); ``cpu_ms_per_request``: CPU ms of each process over the measured pass
  divided by ``requests`` (gaps included, so the background below is part of it;
  ``load_generator`` is this process: the SDK and the supervisor's thread;
  ``executor_loop`` is the executor's event loop alone, also counted in ``executor``);
  ``serving_cpu_ms_per_request``: their sum over every process but ``executor`` and
  ``executor_loop`` (gateway, scheduler, predictor, ledger, valkey, load generator...);
  ``idle_cpu_ms_per_s``: each process's CPU ms per second of the idle sleep (background:
  heartbeats, polls).
* ``back_to_back``: the same requests with no gap: ``first_token_ms``, ``e2e_ms``,
  ``seconds``.
* ``serving_ms``: ``paced.first_token_ms.p50`` minus ``engine_adapters.first_step_ms``
  (the serving path's share of the first token when it arrives idle);
  ``serving_ms_back_to_back``: the same from ``back_to_back``.
* ``conditions``: the options, ``how`` (the call that produced it), the device, CPUs,
  Python and machine.

``quick``: 20 requests, 4 adapters, one round (``gap_ms`` kept): it checks that it runs; its
figures mean little.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import trio

from vajra.bench.bus import bench_cluster
from vajra.bench.serving import _cpu_by_process, _executor_engine, _load_adapters, bench_adapters
from vajra.client import AsyncClient
from vajra.traces._replay_support import summary
from vajra.traces.replay import prompt_of

#: Seconds of idle sleep over which the background CPU is measured.
_IDLE_S = 2.0
#: A bound on one request end to end (the SDK's own deadline is below it).
_REQUEST_TIMEOUT_S = 120.0
#: Processes that run the model; every other one is the serving path or the client.
_EXECUTOR_PROCESSES = ("executor", "executor_loop")


# --- the engine alone -------------------------------------------------------------------------


def run_engine_one(model_dir: Path, prompt: str, max_tokens: int, rounds: int) -> dict[str, Any]:
    """The executor's engine with one adapter loaded, one request on it stepped until done:
    the median round's seconds, its first step (the prefill) and its mean step, in ms."""
    from vajra.gpu.interface import GenerationRequest
    from vajra.policies.decoding import SamplingParams

    engine, threads = _executor_engine(model_dir)
    slot = _load_adapters(engine, model_dir, bench_adapters(model_dir, 1))[0]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    def one_round(tag: str) -> tuple[float, float, int]:
        request = GenerationRequest(tag, prompt, params, slot)
        default = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            start = time.perf_counter()
            engine.step([request], [])
            first = time.perf_counter() - start
            steps = 1
            while engine.has_work():
                engine.step([], [])
                steps += 1
            return time.perf_counter() - start, first, steps
        finally:
            torch.set_num_threads(default)

    one_round("warm")
    runs = [one_round(f"r{r}") for r in range(rounds)]
    seconds = statistics.median(r[0] for r in runs)
    steps = runs[-1][2]
    return {
        "seconds": round(seconds, 6),
        "steps": steps,
        "first_step_ms": round(statistics.median(r[1] for r in runs) * 1000, 3),
        "step_ms": round(seconds / steps * 1000, 3),
        "torch_threads": threads,
        "rounds": rounds,
    }


# --- through the cluster ----------------------------------------------------------------------


async def _one_request(
    client: AsyncClient, prompt: str, adapter: str, max_tokens: int
) -> tuple[float, float]:
    """Stream one request to its end: (seconds to its first token, seconds to its end)."""
    start = time.perf_counter()
    first: float | None = None
    with trio.fail_after(_REQUEST_TIMEOUT_S):
        async with client.stream(prompt, adapter, max_tokens=max_tokens, ignore_eos=True) as chunks:
            async for chunk in chunks:
                if chunk.token_ids and first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    return (first if first is not None else end) - start, end - start


async def _sequence(
    client: AsyncClient,
    prompt: str,
    names: list[str],
    requests: int,
    max_tokens: int,
    gap_ms: float,
) -> dict[str, Any]:
    """``requests`` streams one at a time, each sent ``gap_ms`` after the previous ended."""
    first_ms: list[float] = []
    e2e_ms: list[float] = []
    start = time.perf_counter()
    for i in range(requests):
        if gap_ms > 0:
            await trio.sleep(gap_ms / 1000.0)
        first, e2e = await _one_request(client, prompt, names[i % len(names)], max_tokens)
        first_ms.append(first * 1000.0)
        e2e_ms.append(e2e * 1000.0)
    return {
        "first_token_ms": summary(first_ms),
        "e2e_ms": summary(e2e_ms),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _cpu_diff_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU ms each process used between two :func:`_cpu_by_process` readings."""
    return {name: (t - before.get(name, 0.0)) * 1000.0 for name, t in sorted(after.items())}


async def _drive(
    address: str,
    api_key: str,
    model_dir: Path,
    prompt: str,
    *,
    requests: int,
    gap_ms: float,
    max_tokens: int,
    n_adapters: int,
) -> dict[str, Any]:
    """The warm-up, the idle sleep, the paced pass and the back-to-back pass."""
    async with AsyncClient(address, api_key, timeout_s=_REQUEST_TIMEOUT_S - 10) as client:
        await client.ping()
        names = [
            (await client.push_adapter_bytes(config, weights, f"paced-{i}")).name
            for i, (config, weights) in enumerate(bench_adapters(model_dir, n_adapters))
        ]
        for name in names:  # each adapter served once: none measured below is cold
            await _one_request(client, prompt, name, max_tokens)

        before = _cpu_by_process()
        t0 = time.perf_counter()
        await trio.sleep(_IDLE_S)
        idle_s = time.perf_counter() - t0
        idle = _cpu_diff_ms(before, _cpu_by_process())

        before = _cpu_by_process()
        paced = await _sequence(client, prompt, names, requests, max_tokens, gap_ms)
        used = _cpu_diff_ms(before, _cpu_by_process())

        back_to_back = await _sequence(client, prompt, names, requests, max_tokens, 0.0)

    per_request = {name: ms / requests for name, ms in used.items()}
    serving_cpu = sum(ms for n, ms in per_request.items() if n not in _EXECUTOR_PROCESSES)
    paced.update(
        gap_ms=gap_ms,
        cpu_ms_per_request={n: round(ms, 3) for n, ms in per_request.items()},
        serving_cpu_ms_per_request=round(serving_cpu, 3),
        idle_cpu_ms_per_s={n: round(ms / idle_s, 3) for n, ms in idle.items()},
    )
    return {"paced": paced, "back_to_back": back_to_back}


def _serving_ms(first_token_ms: dict[str, Any], engine: dict[str, Any]) -> float:
    """The first token's p50 less the engine's own first step, in ms."""
    return round(float(first_token_ms["p50"]) - float(engine["first_step_ms"]), 3)


def run_paced_bench(
    *,
    requests: int = 200,
    gap_ms: float = 43.0,
    max_tokens: int = 8,
    prompt_tokens: int = 64,
    adapters: int = 50,
    rounds: int = 5,
    quick: bool = False,
) -> dict[str, Any]:
    """Every measurement of the module docstring, as a JSON-ready dict. ``quick``: 20
    requests, 4 adapters, one engine round (checks that it runs; its figures mean little)."""
    if requests < 1 or adapters < 1 or rounds < 1 or max_tokens < 1 or gap_ms < 0:
        raise ValueError("requests, adapters, rounds and max_tokens must be >= 1, gap_ms >= 0")
    if quick:
        requests, adapters, rounds = 20, 4, 1
    how = (
        f"run_paced_bench(requests={requests}, gap_ms={gap_ms}, max_tokens={max_tokens}, "
        f"prompt_tokens={prompt_tokens}, adapters={adapters}, rounds={rounds}, quick={quick})"
    )
    prompt = prompt_of(prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="vajra-bench-paced-") as tmp:
        from vajra.gpu.tiny import init_tiny_model

        model_dir = init_tiny_model(Path(tmp) / "tiny")
        engine = run_engine_one(model_dir, prompt, max_tokens, rounds)
        home = Path(tmp) / "home"
        home.mkdir()
        with bench_cluster(home, model=str(model_dir)) as (address, api_key):
            runs = trio.run(
                lambda: _drive(
                    address,
                    api_key,
                    model_dir,
                    prompt,
                    requests=requests,
                    gap_ms=gap_ms,
                    max_tokens=max_tokens,
                    n_adapters=adapters,
                )
            )

    return {
        "benchmark": "paced",
        "path": "AsyncClient -> gateway -> scheduler -> executor(tiny model) -> gateway -> client",
        "engine_adapters": engine,
        **runs,
        "serving_ms": _serving_ms(runs["paced"]["first_token_ms"], engine),
        "serving_ms_back_to_back": _serving_ms(runs["back_to_back"]["first_token_ms"], engine),
        "conditions": {
            "requests": requests,
            "gap_ms": gap_ms,
            "max_tokens": max_tokens,
            "prompt_tokens": prompt_tokens,
            "rounds": rounds,
            "adapters": adapters,
            "quick": quick,
            "how": how,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
