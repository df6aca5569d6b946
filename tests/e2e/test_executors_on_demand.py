"""Executors started on demand by a real `vajra up` (``[provisioning]``).

One executor with room for two requests gets a sustained flood: the scheduler asks for a start,
the supervisor starts ``exec-1``, which joins and serves; no request fails. Once the flood is
over and ``exec-1`` has been idle for ``idle_stop_s`` it drains and exits, ``exec-0`` (started
with the cluster) keeps serving, and a second flood starts ``exec-1`` again.

Test rules: loopback only; every wait bounded; no timing assertions.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from tests.e2e.harness import RunningCluster, pgrep, running_cluster
from vajra.client import AsyncClient, VajraError
from vajra.state import ClusterState

pytestmark = pytest.mark.e2e

CONFIG = """
[executor]
max_batch_size = 1
max_queue = 1
[provisioning]
local_executor_start = true
max_executors = 2
executor_start_s = 120.0
idle_stop_s = 3.0
"""


def _live(cluster: RunningCluster) -> set[str]:
    with ClusterState(cluster.redis_url) as state:
        return {hb.executor_id for hb in state.heartbeats.list()}


def _exec1_pids(cluster: RunningCluster) -> list[int]:
    return pgrep(f"--config {cluster.home}/run/cluster.toml --executor-id exec-1")


async def _poll(done: Callable[[], bool]) -> None:
    """Until ``done()`` (a blocking check, run in a thread) holds."""
    while not await trio.to_thread.run_sync(done):  # noqa: ASYNC110 - the check blocks
        await trio.sleep(0.2)


async def _flood_until_exec1_serves(cluster: RunningCluster, key: str) -> tuple[int, list[str]]:
    """Eight clients send requests back to back until exec-1 has a heartbeat, then 2 s more;
    the number answered and every error."""
    answered = 0
    errors: list[str] = []
    stop_at: list[float] = []

    async def client_loop(c: AsyncClient, i: int) -> None:
        nonlocal answered
        n = 0
        while not stop_at or trio.current_time() < stop_at[0]:
            try:
                r = await c.infer(f"flood {i} {n}", max_tokens=24, timeout_s=150)
                assert r.text is not None
                answered += 1
            except VajraError as exc:
                errors.append(f"{exc.code}: {exc}")
                return
            n += 1

    async def watch() -> None:
        await _poll(lambda: "exec-1" in _live(cluster))
        stop_at.append(trio.current_time() + 2.0)

    with trio.fail_after(240):
        async with (
            AsyncClient(cluster.gateway, key, timeout_s=150) as c,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(watch)
            for i in range(8):
                nursery.start_soon(client_loop, c, i)
    return answered, errors


async def test_a_flood_starts_an_executor_which_stops_once_idle(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    with running_cluster(tmp_path, tiny_model_dir, config_text=CONFIG) as cluster:
        key = cluster.create_tenant(f"ondemand-{uuid.uuid4().hex[:6]}")[1]
        assert _live(cluster) == {"exec-0"}
        answered, errors = await _flood_until_exec1_serves(cluster, key)
        assert errors == []
        assert answered >= 8
        assert "starting executor exec-1 on demand" in cluster.full_log()
        assert len(_exec1_pids(cluster)) == 1
        # exec-1 served some of the flood: its usage journal holds their events.
        journal = cluster.home / "usage" / "exec-1"
        assert any(f.stat().st_size > 0 for f in journal.glob("usage-*.jsonl"))
        # Idle for idle_stop_s: exec-1 drains and exits; exec-0 stays.
        with trio.move_on_after(60):
            await _poll(lambda: not _exec1_pids(cluster))
        assert _exec1_pids(cluster) == []
        assert "stopping executor exec-1 started on demand" in cluster.full_log()
        async with AsyncClient(cluster.gateway, key, timeout_s=60) as c:
            assert (await c.infer("still here", max_tokens=4)).text is not None
        # A second flood starts exec-1 again (its id is free once its process exited).
        answered, errors = await _flood_until_exec1_serves(cluster, key)
        assert errors == [] and answered >= 8
        assert cluster.full_log().count("starting executor exec-1 on demand") == 2
