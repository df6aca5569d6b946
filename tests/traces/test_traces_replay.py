"""``vajra replay``'s driver against a real in-process cluster (tiny model, real adapters).

Test rules: ipc sockets in a temp dir and loopback only (the executor's metrics endpoint),
a real Valkey, ledger and object store; every test under ``trio.fail_after``; figures are
checked against each other (requests, cold + warm, billed totals), never against timings.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from tests.inprocess import inprocess_config
from vajra.actors.executor import Executor
from vajra.actors.gateway import Gateway
from vajra.actors.ledger import Ledger
from vajra.actors.metrics import serve_actor_metrics
from vajra.actors.scheduler import Scheduler
from vajra.adapters.format import base_model_spec
from vajra.client import AsyncClient, UnavailableError
from vajra.state import ClusterState
from vajra.traces import Trace, TraceError, map_to_adapters, synthetic_slora
from vajra.traces._replay_support import adapter_loads, register_adapters
from vajra.traces.replay import ReplayOptions, replay


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until_served(client: AsyncClient) -> None:
    for _ in range(100):
        try:
            await client.infer("hello", max_tokens=1)
            break
        except UnavailableError:  # the executor's hello may still be on its way
            await trio.sleep(0.1)
    # The ledger counts that request a moment later: wait, so that replay's "before" snapshot
    # of the tenant's usage already holds it.
    for _ in range(300):
        if (await client.usage()).requests >= 1:
            return
        await trio.sleep(0.05)
    raise AssertionError("the warm-up request never reached the ledger")


async def test_replay_reports_latency_cold_starts_and_cost(
    tmp_path: Path, valkey_url: str, tiny_model_dir: Path
) -> None:
    cfg = (
        inprocess_config(tmp_path / "run", valkey_url, model=str(tiny_model_dir))
        .replace("storage", local_dir=str(tmp_path / "objects"))
        .replace("adapters", max_vram_adapters=2, lru_eviction_threshold=1.0)
        .replace("executor", usage_resend_s=0.2)
    )
    # 4 adapters, 2 GPU slots: some arrivals must find their adapter out of GPU memory
    trace = synthetic_slora(
        adapters=4,
        rate_per_s=12,
        cv=1,
        alpha=1,
        duration_s=3,
        seed=5,
        prompt_tokens=(4, 12),
        output_tokens=(1, 4),
    )
    assert 10 <= len(trace) <= 70
    port = _free_port()
    with ClusterState(valkey_url) as state, trio.fail_after(180):
        _, key = state.tenants.create("replayer")
        async with trio.open_nursery() as nursery:
            await nursery.start(Scheduler(cfg).run)
            executor = Executor(cfg, state, executor_id="exec-0")
            await nursery.start(executor.run)
            serve_actor_metrics(executor, port)
            await nursery.start(Ledger(cfg, state).run)
            address = await nursery.start(Gateway(cfg, state).run)
            async with AsyncClient(address, key, timeout_s=60) as client:
                await _until_served(client)
                spec = base_model_spec(tiny_model_dir)
                names, pushed = await register_adapters(client, spec, 4, prefix="r")
                assert names == ["r-0", "r-1", "r-2", "r-3"] and pushed == 4
                again, pushed_again = await register_adapters(client, spec, 4, prefix="r")
                assert again == names and pushed_again == 0  # reused, not re-pushed

                opts = ReplayOptions(speed=2.0, max_inflight=64, timeout_s=60, settle_s=15)
                report = await replay(
                    client, trace, names, opts, metrics_urls=[f"http://127.0.0.1:{port}/metrics"]
                )
                assert report["arrivals"] == len(trace)
                assert report["completed"] + sum(report["errors"].values()) == len(trace)
                assert report["completed"] == len(trace), report["errors"]
                ttft, e2e = report["ttft_ms"], report["e2e_ms"]
                assert ttft["n"] == e2e["n"] == len(trace)
                assert 0 < ttft["p50"] <= e2e["p50"] and ttft["p99"] <= e2e["max"]
                cold = report["cold_starts"]
                assert cold["cold"] + cold["warm"] == len(trace)
                assert cold["cold"] >= 4  # each adapter's first request at least
                # the executors' own load times: every adapter fetched once from the store,
                # and copied into a GPU slot at least once per cold request
                loads = cold["loads"]
                assert set(loads) == {"store", "disk", "host", "gpu"}
                assert loads["store"]["loads"] >= 4 and loads["store"]["mean_ms"] > 0
                assert loads["gpu"]["loads"] >= 4 and loads["gpu"]["mean_ms"] > 0
                assert report["billing"]["requests"] == len(trace)
                assert report["billing"]["cost_usd"] > 0
                assert report["output_tokens"] == int(trace.output_tokens.sum())

                # a burst far above max_inflight: the replayer sheds, and counts it
                burst = Trace(
                    t_ms=[0.0] * 12,
                    source=[0] * 12,
                    prompt_tokens=[4] * 12,
                    output_tokens=[4] * 12,
                    sources=["0"],
                    name="burst",
                )
                shed = await replay(client, burst, names, ReplayOptions(max_inflight=2, settle_s=5))
                assert shed["errors"].get("shed_client", 0) >= 8
                assert shed["completed"] + shed["errors"]["shed_client"] == 12
                assert shed["cold_starts"]["source"].startswith("unknown")

                with pytest.raises(TraceError, match="adapters"):
                    await replay(client, map_to_adapters(trace, 4, mode="striped"), names[:2], opts)
                with pytest.raises(TraceError, match="speed"):
                    await replay(client, trace, names, ReplayOptions(speed=0.0))
            nursery.cancel_scope.cancel()


def test_adapter_loads_are_the_difference_between_two_readings() -> None:
    before = {"load_store_count": 2.0, "load_store_sum": 0.010, "load_gpu_count": 1.0}
    after = {
        "load_store_count": 6.0,
        "load_store_sum": 0.030,  # 4 loads, 20 ms
        "load_gpu_count": 1.0,
        "load_gpu_sum": 0.5,
        "load_host_count": 1.0,
        "load_host_sum": 0.0025,
    }
    assert adapter_loads(before, after) == {
        "store": {"loads": 4, "mean_ms": 5.0},
        "disk": {"loads": 0, "mean_ms": None},
        "host": {"loads": 1, "mean_ms": 2.5},
        "gpu": {"loads": 0, "mean_ms": None},
    }
