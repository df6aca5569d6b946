"""Swap under load through training: 20 train-then-swap cycles and 5 rollbacks on a real
cluster (`vajra up --executors 2`, the tiny model on the CPU, placement by load alone so that
requests for the one adapter keep both executors busy).

A fresh training job makes version 1 of ``chat``; requests are then spread until both
executors hold it in GPU memory. Clients stream requests for ``chat`` without pause while the
test runs 20 small training jobs in sequence (4 optimizer steps each, a different dataset and
seed per cycle, each continuing from the active version), every one published by its executor
through the warm swap, with 5 rollbacks interleaved. Checked:

- every request succeeds;
- every answer equals, token for token, the greedy answer of one version that was active
  while it ran; each version's answer is what PEFT itself generates from that version's files
  in the cluster's object store (and what ``chat@VERSION`` answers), and consecutive versions
  answer differently often enough that a mixed answer would show;
- both executors held the old version at every swap (each counts a ``swap_warms_loaded`` per
  swap) and neither counts a cold load after version 1 was resident on it: the first request
  after each swap, like every other, finds its version in GPU memory;
- after each swap ``chat@PREVIOUS`` answers exactly as before, after each rollback ``chat``
  answers as that version did;
- careless calls under load (a rollback to a version that does not exist, a job from one, a
  job naming another rank, a dataset that is not JSON Lines) are refused with typed errors,
  queue nothing and move nothing.

Test rules: loopback only; every wait bounded (``fail_after``); no timing assertions; the
cluster is stopped with SIGTERM at the end and must exit 0, leaving no process behind.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.e2e.harness import (
    RunningCluster,
    cluster_pids,
    start_cluster,
    stop_cluster,
    wait_gone,
)
from tests.e2e.swap_kit import answer, executor_counters, free_metrics_base
from tests.reference import peft_greedy_many
from vajra.bench.train import WORDS
from vajra.client import AdapterInfo, AsyncClient, InvalidRequest, NotFoundError, VajraError
from vajra.storage.adapters import adapter_object_keys

pytestmark = pytest.mark.e2e

PROMPT = "The river"
TOKENS = 8
CYCLES = 20
ROLLBACKS = 5
STREAMERS = 3
EXECUTORS = 2
#: One small job: 4 optimizer steps of 2 rows (2 epochs of 4 rows) at the cluster's largest
#: learning rate, no checkpoint.
STEPS = 4
LIMIT_S = 300


METRICS_BASE = free_metrics_base(EXECUTORS)
CONFIG = f"""
[cluster]
metrics_port = {METRICS_BASE}
[executor]
max_model_len = 128
heartbeat_interval_s = 0.2
[policies]
# Placement by load alone, so requests for the one adapter keep both executors busy.
placement_alpha = 1.0
placement_beta = 0.0
placement_gamma = 0.0
[training]
progress_poll_s = 0.1
[http]
enabled = false
"""


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningCluster]:
    args = ("--gateway-port", "0", "--executors", str(EXECUTORS))
    c = start_cluster(
        tmp_path_factory.mktemp("trainswap"), tiny_model_dir, config_text=CONFIG, args=args
    )
    try:
        yield c
    finally:
        if c.process.poll() is None:
            stop_cluster(c)
        leftovers, _ = wait_gone(cluster_pids(c.home), timeout=10.0)
        assert not leftovers, f"processes left running: {leftovers}"


def _counters(executor: int) -> dict[str, float]:
    return executor_counters(METRICS_BASE, executor)


async def _all_counters() -> list[dict[str, float]]:
    return [await trio.to_thread.run_sync(_counters, i) for i in range(EXECUTORS)]


def _get(counters: list[dict[str, float]], event: str) -> list[float]:
    return [c.get(event, 0.0) for c in counters]


def _dataset(cycle: int) -> bytes:
    """Cycle ``cycle``'s data: the prompt, and a few others, with completions of its own."""
    rng = random.Random(cycle)
    rows = []
    for prompt in (PROMPT, "The town", "A morning", "The river runs"):
        words = " ".join(rng.choice(WORDS) for _ in range(6))
        rows.append({"prompt": prompt, "completion": f" {words}."})
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


async def _answer(c: AsyncClient, adapter: str, stream: bool) -> list[int]:
    return await answer(c, PROMPT, adapter, TOKENS, stream=stream)


async def _train(c: AsyncClient, cycle: int, parent: int | None) -> int:
    """Cycle ``cycle``'s job, continuing from version ``parent`` (None: a fresh adapter),
    followed until it ends; the version it published."""
    fresh = parent is None
    job = await c.train(
        "chat",
        _dataset(cycle),
        epochs=2,
        max_steps=STEPS,
        batch_size=2,
        learning_rate=1e-2,
        seed=cycle,
        fresh=fresh,
        # A fresh adapter's shape; later jobs continue from the active version's.
        rank=8 if fresh else None,
        alpha=16.0 if fresh else None,
        target_modules=["q_proj", "v_proj"] if fresh else None,
        checkpoint_every=0,
    )
    done = await job.wait(timeout_s=120)
    assert done.status == "succeeded" and done.result_version is not None, done
    assert done.step == STEPS and done.from_version == parent, done
    return done.result_version


def _peft_answers(
    cluster: RunningCluster, infos: list[AdapterInfo], tmp: Path
) -> dict[int, list[int]]:
    """What PEFT generates greedily from each version's files in the object store."""
    paths: dict[int, Path] = {}
    objects = cluster.home / "objects"
    for info in infos:
        matches = list(objects.glob(f"**/{info.digest}"))
        assert len(matches) == 1, (info.version, matches)
        folder = tmp / f"v{info.version}"
        folder.mkdir()
        for key in adapter_object_keys(str(matches[0].relative_to(objects))):
            shutil.copy(objects / key, folder / Path(key).name)
        paths[info.version] = folder
    ref = peft_greedy_many(cluster.model_dir, list(paths.values()), [PROMPT], TOKENS)
    return {v: ref[p, PROMPT] for v, p in paths.items()}


async def test_twenty_train_then_swap_cycles_and_rollbacks_under_load(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    _, key = cluster.create_tenant(f"cycles-{uuid.uuid4().hex[:6]}")
    rng = random.Random(5)
    expected: dict[int, list[int]] = {}  # version -> its answer through chat@VERSION
    parents: dict[int, int] = {}  # trained version -> the version its job continued from
    timeline: list[int] = []  # versions in the order they were asked to become active
    answers: list[tuple[int, int, list[int]]] = []  # (timeline index at start, at end, tokens)
    failures: list[BaseException] = []
    stop = trio.Event()

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

    with trio.fail_after(LIMIT_S):
        async with AsyncClient(cluster.gateway, key, timeout_s=60) as c:
            timeline.append(await _train(c, 0, None))
            assert timeline == [1]
            expected[1] = await _answer(c, "chat@1", False)
            # Spread requests until version 1 is resident on both executors.
            with trio.fail_after(60):
                while True:
                    async with trio.open_nursery() as nursery:
                        for _ in range(4):
                            nursery.start_soon(_answer, c, "chat", False)
                    seen = await _all_counters()
                    served = [
                        w + k
                        for w, k in zip(
                            _get(seen, "adapter_requests_warm"),
                            _get(seen, "adapter_requests_cold"),
                            strict=True,
                        )
                    ]
                    if all(s > 0 for s in served):
                        break
            cold = _get(seen, "adapter_requests_cold")
            served_before = _get(seen, "adapter_requests_warm")
            assert all(k >= 1 for k in cold), cold  # each executor's one cold load
            warms = _get(seen, "swap_warms_loaded")

            async with trio.open_nursery() as nursery:
                for n in range(STREAMERS):
                    nursery.start_soon(streamer, c, n)
                await trio.sleep(0.3)
                rollback_after = set(rng.sample(range(2, CYCLES + 1), ROLLBACKS))
                cycle = 0
                while cycle < CYCLES or len(timeline) < 1 + CYCLES + ROLLBACKS:
                    previous = timeline[-1]
                    if cycle in rollback_after:
                        rollback_after.discard(cycle)
                        target = rng.choice([v for v in expected if v != previous])
                        timeline.append(target)
                        info = await c.rollback("chat", target)
                        assert info.version == target and info.active
                    else:
                        cycle += 1
                        timeline.append(len(expected) + 1)
                        version = await _train(c, cycle, previous)
                        assert version == timeline[-1], (version, timeline)
                        parents[version] = previous
                        expected[version] = await _answer(c, f"chat@{version}", True)
                    # The first request after the swap: the new version, and no cold load.
                    assert await _answer(c, "chat", False) == expected[timeline[-1]]
                    now = await _all_counters()
                    assert _get(now, "adapter_requests_cold") == cold, (len(timeline), now)
                    # Every executor held the old version, so every one warmed the new one.
                    loaded = _get(now, "swap_warms_loaded")
                    assert all(b > a for a, b in zip(warms, loaded, strict=True)), (
                        len(timeline),
                        warms,
                        loaded,
                    )
                    warms = loaded
                    assert await _answer(c, f"chat@{previous}", False) == expected[previous]
                # Careless calls under load: refused, nothing queued, nothing moves.
                with pytest.raises(NotFoundError):
                    await c.rollback("chat", 10_000)
                with pytest.raises(NotFoundError):
                    await c.train("chat", _dataset(99), from_version=10_000, max_steps=1)
                with pytest.raises(InvalidRequest):  # another rank than the adapter's
                    await c.train("chat", _dataset(99), rank=4, max_steps=1)
                with pytest.raises(InvalidRequest):  # not JSON Lines
                    await c.train("chat", b"prompt,completion\nhi,there\n", max_steps=1)
                assert all(j.status == "succeeded" for j in await c.jobs(limit=100))
                assert await _answer(c, "chat", True) == expected[timeline[-1]]
                await trio.sleep(0.3)
                stop.set()
            versions = await c.versions("chat")
            final = await _all_counters()

    assert failures == []
    assert len(answers) > CYCLES + ROLLBACKS, "the streamers did not keep requests flowing"
    for start, end, tokens in answers:
        allowed = [expected[v] for v in timeline[max(0, start - 1) : end + 1]]
        assert tokens in allowed, (start, end, tokens)
    assert _get(final, "adapter_requests_cold") == cold
    served = [
        b - a for a, b in zip(served_before, _get(final, "adapter_requests_warm"), strict=True)
    ]
    assert all(s >= CYCLES for s in served), served  # both executors kept serving
    assert all(f == 0 for f in _get(final, "swap_warms_failed")), final
    # Most swaps change the answer, so an answer mixing two versions would show.
    swaps = len(timeline) - 1
    differ = sum(expected[a] != expected[b] for a, b in itertools.pairwise(timeline))
    assert differ >= swaps // 2, (differ, timeline, expected)
    distinct = len({tuple(t) for t in expected.values()})
    print(f"\n{len(answers)} answers, per executor {served}; {differ} of {swaps} swaps changed")
    print(f"the answer; {distinct} distinct answers among {len(expected)} versions")
    # versions(): the last flip is active; each trained version continues from its parent.
    assert len(versions) == 1 + CYCLES
    assert [v.active for v in versions].count(True) == 1
    assert next(v for v in versions if v.active).version == timeline[-1]
    assert all(v.source == "train" and v.metrics["final_loss"] > 0 for v in versions)
    assert {v.version: v.parent_version for v in versions if v.version > 1} == parents
    # The reference: PEFT itself, from each version's stored files.
    peft = await trio.to_thread.run_sync(_peft_answers, cluster, versions, tmp_path)
    assert peft == expected
