"""Warm hot swap under load on a real cluster (`vajra up`, the tiny model on the CPU).

Clients stream requests for ``chat`` without pause while a publisher pushes 20 new versions
from memory (``push_adapter_tensors``) and rolls back 5 times. Every request must succeed;
every answer must equal, token for token, what PEFT generates with one version that was
active while it ran (versions of one source adapter share its weights, consecutive versions
never do, so an answer mixing two versions matches none); the executor, which holds the
active version throughout, must count no cold load after the first version's; and after
each swap ``chat@PREVIOUS`` still answers exactly as before, and after each rollback
``chat`` answers as that version did.

Test rules: loopback only; every wait bounded; PEFT itself is the reference.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from safetensors.torch import load_file

from tests.e2e.harness import RunningCluster, running_cluster
from tests.e2e.swap_kit import answer, executor_counters, free_metrics_base
from tests.reference import peft_greedy_many, save_peft_adapters
from vajra.client import AsyncClient, VajraError

pytestmark = pytest.mark.e2e

PROMPT = "The river"
TOKENS = 6
PUSHES = 20
ROLLBACKS = 5
STREAMERS = 3


METRICS_BASE = free_metrics_base()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningCluster]:
    config = f"[cluster]\nmetrics_port = {METRICS_BASE}\n[http]\nenabled = false\n"
    with running_cluster(
        tmp_path_factory.mktemp("hotswap"), tiny_model_dir, config_text=config
    ) as c:
        yield c


def _executor_counters() -> dict[str, float]:
    return executor_counters(METRICS_BASE)


async def _cold_loads() -> float:
    counters = await trio.to_thread.run_sync(_executor_counters)
    return counters.get("adapter_requests_cold", 0.0)


async def _answer(c: AsyncClient, adapter: str, stream: bool) -> list[int]:
    return await answer(c, PROMPT, adapter, TOKENS, stream=stream)


async def test_swaps_and_rollbacks_under_load_are_warm_whole_and_fail_nothing(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    paths = save_peft_adapters(cluster.model_dir, tmp_path, [4] * 6, seed=23)
    ref = peft_greedy_many(cluster.model_dir, paths, [PROMPT], TOKENS)
    # Sources with distinct answers; consecutive versions alternate between them.
    sources: list[Path] = []
    for p in paths:
        if all(ref[p, PROMPT] != ref[q, PROMPT] for q in sources):
            sources.append(p)
    assert len(sources) >= 3, "the reference adapters must answer differently"
    loaded: list[tuple[dict[str, Any], dict[str, Any]]] = [
        (
            load_file(str(p / "adapter_model.safetensors")),
            json.loads((p / "adapter_config.json").read_text()),
        )
        for p in sources
    ]
    _, key = cluster.create_tenant(f"swap-{uuid.uuid4().hex[:6]}")
    rng = random.Random(3)
    expected: dict[int, list[int]] = {}  # version -> its answer
    timeline: list[int] = []  # versions in the order they were asked to become active
    answers: list[tuple[int, int, list[int]]] = []  # (timeline index at start, at end, tokens)
    failures: list[BaseException] = []
    stop = trio.Event()

    async def push(c: AsyncClient, version_no: int, previous: int | None) -> int:
        src = version_no % len(sources)
        if previous is not None and expected[previous] == ref[sources[src], PROMPT]:
            src = (src + 1) % len(sources)
        tensors, config = loaded[src]
        config = {**config, "revision": f"v{version_no}"}  # a new digest for every version
        info = await c.push_adapter_tensors(
            "chat", tensors, config, metrics={"final_loss": 1.0 / version_no}
        )
        expected[info.version] = ref[sources[src], PROMPT]
        return info.version

    async def streamer(c: AsyncClient, n: int) -> None:
        i = 0
        while not stop.is_set():
            start = len(timeline) - 1
            try:
                tokens = await _answer(c, "chat", stream=(n + i) % 2 == 0)
            except VajraError as exc:
                failures.append(exc)
                return
            answers.append((start, len(timeline) - 1, tokens))
            i += 1

    with trio.fail_after(600):
        async with AsyncClient(cluster.gateway, key, timeout_s=60) as c:
            timeline.append(await push(c, 1, None))
            assert await _answer(c, "chat", False) == expected[1]  # the one cold load
            cold = await _cold_loads()
            assert cold >= 1
            async with trio.open_nursery() as nursery:
                for n in range(STREAMERS):
                    nursery.start_soon(streamer, c, n)
                await trio.sleep(0.5)
                rollback_at = set(rng.sample(range(2, PUSHES + 1), ROLLBACKS))
                for k in range(2, PUSHES + 2):
                    previous = timeline[-1]
                    if k - 1 in rollback_at and len(expected) > 2:
                        target = rng.choice([v for v in expected if v != previous])
                        timeline.append(target)
                        info = await c.rollback("chat", target)
                        assert info.version == target and info.active
                    else:
                        timeline.append(len(expected) + 1)
                        version = await push(c, len(expected) + 1, previous)
                        assert version == timeline[-1]
                    # The first request after the swap: the new version, and not a cold load.
                    assert await _answer(c, "chat", False) == expected[timeline[-1]]
                    assert await _cold_loads() == cold, f"cold load after swap {k}"
                    # The previous version by NAME@VERSION answers exactly as before.
                    assert await _answer(c, f"chat@{previous}", True) == expected[previous]
                    await trio.sleep(0.05)
                stop.set()
            versions = await c.versions("chat")
    assert failures == []
    assert len(answers) > PUSHES, "the streamers did not keep requests flowing"
    for start, end, tokens in answers:
        allowed = {expected[v] == tokens for v in timeline[max(0, start - 1) : end + 1]}
        assert True in allowed, (start, end, tokens)
    assert await _cold_loads() == cold
    counters = await trio.to_thread.run_sync(_executor_counters)
    assert counters.get("swap_warms_loaded", 0) >= PUSHES  # every swap warmed the new one
    # versions(): the last flip is active; metadata and parents were recorded.
    assert [v.active for v in versions].count(True) == 1
    assert next(v for v in versions if v.active).version == timeline[-1]
    assert all(v.metrics["final_loss"] > 0 for v in versions)
    assert all(v.parent_version is not None for v in versions if v.version > 1)
