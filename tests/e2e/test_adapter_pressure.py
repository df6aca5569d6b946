"""Three tenants hammer one executor whose GPU pool and host slab are far smaller than the
working set of their adapters: every answer equals what PEFT generates for the requesting
tenant's own adapter, and nothing but retriable errors ever comes back.

Test rules: loopback only; every wait bounded; PEFT itself is the reference.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.e2e.harness import RunningCluster, pgrep, running_cluster
from tests.reference import peft_greedy_many, save_peft_adapters
from vajra.client import AsyncClient, VajraError

pytestmark = pytest.mark.e2e

# One GPU slot per rank class (8, 16, 32, 64), one host slot per class, a disk cache that
# holds about one adapter: nine adapters of ranks 4-16 must keep moving through every tier.
CONFIG = """
[adapters]
max_vram_adapters = 4
lru_eviction_threshold = 1.0
host_cache_bytes = 1
disk_cache_bytes = 400000
[executor]
max_batch_size = 8
"""
RANKS = [4, 8, 16, 4, 8, 16, 4, 8, 16]
PROMPTS = ["The river", "numbers: 1 2 3"]
TOKENS = 6


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningCluster]:
    with running_cluster(
        tmp_path_factory.mktemp("pressure"), tiny_model_dir, config_text=CONFIG
    ) as c:
        yield c


async def test_three_tenants_get_their_own_adapters_answers_under_tier_pressure(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    paths = save_peft_adapters(cluster.model_dir, tmp_path, RANKS, seed=11)
    expected = peft_greedy_many(cluster.model_dir, paths, PROMPTS, TOKENS)
    keys = [cluster.create_tenant(f"pressure{i}-{uuid.uuid4().hex[:6]}")[1] for i in range(3)]
    # Tenant i owns adapters 3i .. 3i+2, all three named a0, a1, a2 (names are per tenant).
    own = {(i, f"a{j}"): paths[3 * i + j] for i in range(3) for j in range(3)}
    executor_pid = pgrep(f"actor executor --config {cluster.home}/run/cluster.toml")
    rng = random.Random(5)
    jobs = [(rng.randrange(3), f"a{rng.randrange(3)}", rng.choice(PROMPTS)) for _ in range(120)]
    answers: list[tuple[int, str, str, list[int]]] = []
    retries = 0
    unexpected: list[BaseException] = []

    async def one(c: AsyncClient, tenant: int, name: str, prompt: str, stream: bool) -> None:
        nonlocal retries
        for attempt in range(30):
            try:
                if stream:
                    tokens: list[int] = []
                    async with c.stream(prompt, adapter=name, max_tokens=TOKENS) as s:
                        async for chunk in s:
                            tokens += chunk.token_ids
                else:
                    tokens = list((await c.infer(prompt, adapter=name, max_tokens=TOKENS)).tokens)
                answers.append((tenant, name, prompt, tokens))
                return
            except VajraError as exc:
                if not exc.retriable:
                    unexpected.append(exc)
                    return
                retries += 1
                await trio.sleep(0.05 * (attempt + 1))
        unexpected.append(RuntimeError(f"{tenant}/{name} never answered"))

    with trio.fail_after(300):
        async with (
            AsyncClient(cluster.gateway, keys[0], timeout_s=60) as c0,
            AsyncClient(cluster.gateway, keys[1], timeout_s=60) as c1,
            AsyncClient(cluster.gateway, keys[2], timeout_s=60) as c2,
        ):
            clients = [c0, c1, c2]
            for i, c in enumerate(clients):
                for j in range(3):
                    await c.push_adapter(own[i, f"a{j}"], f"a{j}")
            async with trio.open_nursery() as nursery:
                for n, (tenant, name, prompt) in enumerate(jobs):
                    nursery.start_soon(one, clients[tenant], tenant, name, prompt, n % 2 == 1)
            status = await c0.cluster_status()
    print(f"{len(answers)} answers, {retries} retriable refusals along the way")
    assert unexpected == []
    assert len(answers) == len(jobs)
    for tenant, name, prompt, tokens in answers:
        assert tokens == expected[own[tenant, name], prompt], (tenant, name, prompt)
    assert all(s.resident_adapters <= 4 for s in status)
    assert pgrep(f"actor executor --config {cluster.home}/run/cluster.toml") == executor_pid
