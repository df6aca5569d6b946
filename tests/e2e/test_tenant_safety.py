"""Multi-tenant safety at the process level: a real `vajra up`, attacked and abused.

- 100 HTTP streams and 100 SDK streams dropped mid-generation stop computing at once and are
  billed for what they computed, once each;
- a flood of random API keys does not starve valid tenants nor grow the gateway without bound;
- hostile adapter uploads (catastrophic regexes, deep JSON, NaN weights) are refused at once
  while other tenants keep their latency, and no actor restarts;
- a gateway killed with SIGKILL during one tenant's long streams: the streams fail fast, no
  token crosses to another tenant, and every request answered afterwards is billed once.

Test rules: loopback only; every wait bounded; the flood runs ``VAJRA_TEST_FLOOD_S`` seconds
(3 by default; 10 reproduces the figure in the closing note).
"""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
import trio
import trio.lowlevel
import zmq

from tests.e2e.harness import RunningCluster, pgrep, running_cluster
from tests.reference import transformers_greedy
from vajra.bus.codec import encode
from vajra.bus.messages import InferRequest
from vajra.client import AsyncClient, InvalidRequest, UnavailableError, VajraError

pytestmark = pytest.mark.e2e

ADMIN_KEY = "admin-key-for-safety-tests"
LONG = 1500  # tokens: a stream that would run for many seconds if nobody stopped it
CONFIG = f"""
[gateway]
max_prompt_chars = 2000
max_tokens_limit = {LONG}
[executor]
max_batch_size = 32
max_queue = 512
heartbeat_interval_s = 0.2
[http]
enabled = true
port = 0
admin_key = "{ADMIN_KEY}"
"""


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningCluster]:
    with running_cluster(
        tmp_path_factory.mktemp("safety"), tiny_model_dir, config_text=CONFIG
    ) as c:
        yield c


def _tenant(cluster: RunningCluster, name: str) -> tuple[str, str]:
    return cluster.create_tenant(f"{name}-{uuid.uuid4().hex[:6]}")


def _actor_pid(cluster: RunningCluster, name: str) -> int:
    pids = pgrep(f"actor {name} --config {cluster.home}/run/cluster.toml")
    assert len(pids) == 1, pids
    return pids[0]


def _usage_events(cluster: RunningCluster, tenant_id: str) -> list[dict[str, str]]:
    client: redis.Redis[str] = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        entries = client.xrange("vajra:usage:events")
    finally:
        client.close()
    return [fields for _, fields in entries if fields.get("tenant_id") == tenant_id]


async def _executor_idle(c: AsyncClient) -> bool:
    status = await c.cluster_status(timeout_s=5)
    return all(e.running == 0 and e.queue_depth == 0 for e in status)


async def _wait_idle(c: AsyncClient, timeout_s: float) -> float:
    """Seconds until the executors run and queue nothing (polled: they live elsewhere)."""
    t0 = trio.current_time()
    with trio.fail_after(timeout_s):
        while not await _executor_idle(c):  # noqa: ASYNC110
            await trio.sleep(0.1)
    return trio.current_time() - t0


async def _wait_billed(cluster: RunningCluster, tenant_id: str, n: int) -> list[dict[str, str]]:
    """The tenant's usage events once ``n`` reached the ledger (and a second passed)."""
    with trio.fail_after(30):
        while len(_usage_events(cluster, tenant_id)) < n:  # noqa: ASYNC110
            await trio.sleep(0.2)
    await trio.sleep(1.0)  # and no more come
    return _usage_events(cluster, tenant_id)


# --- dropped streams ---------------------------------------------------------------------------


async def test_dropped_streams_stop_at_once_and_bill_what_they_computed(
    cluster: RunningCluster,
) -> None:
    """Each wave: 100 streams that ask for LONG tokens, each dropped after 3 chunks. 32 rows
    run at once, so the later streams start only as the earlier ones are dropped."""
    http_tenant, http_key = _tenant(cluster, "http-dropper")
    sdk_tenant, sdk_key = _tenant(cluster, "sdk-dropper")
    received: list[int] = []  # chunks each dropped stream received
    body = {
        "model": cluster.model_dir.name,
        "prompt": "Once upon a time",
        "max_tokens": LONG,
        "temperature": 0,
        "stream": True,
    }

    async def http_drop(http: httpx.AsyncClient) -> None:
        chunks = 0
        h = {"Authorization": f"Bearer {http_key}"}
        async with http.stream("POST", "/v1/completions", json=body, headers=h) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                    if chunks == 3:
                        break  # the client goes away mid-generation
        received.append(chunks)

    async def sdk_drop(c: AsyncClient) -> None:
        chunks = 0
        async with c.stream("Once upon a time", max_tokens=LONG, timeout_s=120) as s:
            async for _ in s:
                chunks += 1
                if chunks == 3:
                    break
        received.append(chunks)

    def check_billing(events: list[dict[str, str]]) -> int:
        """Each request billed once, for the tokens it computed: at least what its client saw,
        and nowhere near the LONG tokens it asked for."""
        assert len(events) == 100 and len({e["request_id"] for e in events}) == 100
        tokens = [int(e["completion_tokens"]) for e in events]
        assert min(tokens) >= 3 and max(tokens) < LONG // 10, sorted(tokens)[-5:]
        return sum(tokens)

    async with AsyncClient(cluster.gateway, ADMIN_KEY) as admin:
        with trio.fail_after(240):
            t0 = trio.current_time()
            limits = httpx.Limits(max_connections=200)
            address = str(cluster.info["http_address"])
            async with (
                httpx.AsyncClient(base_url=address, timeout=120, limits=limits) as http,
                trio.open_nursery() as nursery,
            ):
                for _ in range(100):
                    nursery.start_soon(http_drop, http)
            http_wave_s = trio.current_time() - t0
            http_idle_s = await _wait_idle(admin, 15)
            http_tokens = check_billing(await _wait_billed(cluster, http_tenant, 100))
            t0 = trio.current_time()
            async with (
                AsyncClient(cluster.gateway, sdk_key, timeout_s=120) as c,
                trio.open_nursery() as nursery,
            ):
                for _ in range(100):
                    nursery.start_soon(sdk_drop, c)
            sdk_wave_s = trio.current_time() - t0
            sdk_idle_s = await _wait_idle(admin, 15)
            sdk_tokens = check_billing(await _wait_billed(cluster, sdk_tenant, 100))
        print(
            f"HTTP wave {http_wave_s:.1f}s, idle {http_idle_s:.2f}s later, {http_tokens} tokens "
            f"billed; SDK wave {sdk_wave_s:.1f}s, idle {sdk_idle_s:.2f}s later, "
            f"{sdk_tokens} tokens billed"
        )
        assert len(received) == 200 and all(n == 3 for n in received)
        for tenant_key, tokens in ((http_key, http_tokens), (sdk_key, sdk_tokens)):
            async with AsyncClient(cluster.gateway, tenant_key) as c:
                usage = await c.usage()
            assert usage.requests == 100 and usage.completion_tokens == tokens


# --- a flood of unknown keys -------------------------------------------------------------------


def _flood(address: str, stop: threading.Event, sent: list[int]) -> None:
    """Random-key requests as fast as four raw sockets take them (replies are drained)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socks = []
    for _ in range(4):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 2000)
        s.connect(address)
        socks.append(s)
    n = 0
    try:
        while not stop.is_set():
            for s in socks:
                frames = encode(
                    InferRequest(request_id=f"f{n}", api_key=f"vk_{uuid.uuid4().hex}", prompt="x")
                )
                try:
                    s.send_multipart(frames, zmq.NOBLOCK)
                    n += 1
                except zmq.Again:
                    pass
                try:
                    while True:
                        s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    pass
    finally:
        sent.append(n)
        for s in socks:
            s.close()
        ctx.term()


async def test_a_flood_of_random_keys_does_not_starve_valid_tenants(
    cluster: RunningCluster,
) -> None:
    duration = float(os.environ.get("VAJRA_TEST_FLOOD_S", "3"))
    _, key = _tenant(cluster, "steady")
    gateway = psutil.Process(_actor_pid(cluster, "gateway"))
    rss_before = gateway.memory_info().rss
    latencies: list[float] = []
    stop = threading.Event()
    sent: list[int] = []
    flooder = threading.Thread(target=_flood, args=(cluster.gateway, stop, sent))
    async with AsyncClient(cluster.gateway, key, timeout_s=30) as c:
        await c.infer("warm", max_tokens=1)
        flooder.start()
        try:
            t_end = trio.current_time() + duration
            with trio.fail_after(duration + 60):
                while trio.current_time() < t_end:
                    t0 = trio.current_time()
                    await c.infer("steady", max_tokens=1)  # must never fail
                    latencies.append(trio.current_time() - t0)
                    await trio.sleep(0.01)
        finally:
            stop.set()
            await trio.to_thread.run_sync(flooder.join, 30)
        rss_after = gateway.memory_info().rss
        stats = await c.stats()
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    grew_mb = (rss_after - rss_before) / 2**20
    print(
        f"flood {duration:g}s: {sent[0]} random-key requests sent; valid tenant "
        f"{len(latencies)} answered, p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
        f"p99 {p99 * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms; gateway RSS "
        f"{rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB; "
        f"shed {stats.get('auth_shed_total', 0) + stats.get('auth_shed_client', 0)}"
    )
    assert sent[0] > 1000 and len(latencies) >= duration * 5
    assert p99 < 2.0
    assert grew_mb < 150


# --- hostile uploads -----------------------------------------------------------------------------


def _peft_files(model_dir: Path, tmp: Path) -> tuple[dict[str, Any], bytes]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(tmp)
    config = json.loads((tmp / "adapter_config.json").read_text())
    return config, (tmp / "adapter_model.safetensors").read_bytes()


def _with_nan(weights: bytes) -> bytes:
    """The same safetensors file with its first weight (F32) set to NaN."""
    (n,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + n])
    first = min(v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    at = 8 + n + first
    return weights[:at] + struct.pack("<f", float("nan")) + weights[at + 4 :]


def _deep_header(depth: int) -> bytes:
    header = b"[" * depth + b"]" * depth
    return struct.pack("<Q", len(header)) + header


async def test_hostile_uploads_are_refused_at_once_and_nobody_notices(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    _, attacker = _tenant(cluster, "attacker")
    _, victim = _tenant(cluster, "victim")
    config, weights = _peft_files(cluster.model_dir, tmp_path)
    deep = "[" * 50_000 + "]" * 50_000
    hostile: dict[str, tuple[bytes, bytes]] = {
        "regex target_modules": (
            json.dumps({**config, "target_modules": "(.+)+X" + "a" * 900}).encode(),
            weights,
        ),
        # Catastrophic for Python's re on every module it does not match; it does match q_proj,
        # where it declares a rank the weights do not have: refused.
        "regex rank_pattern": (
            json.dumps({**config, "rank_pattern": {"(.+)+X|q_proj": 8}}).encode(),
            weights,
        ),
        "deep config": (
            json.dumps(config)[:-1].encode() + b', "x": ' + deep.encode() + b"}",
            weights,
        ),
        "deep header": (json.dumps(config).encode(), _deep_header(50_000)),
        "nan weights": (json.dumps(config).encode(), _with_nan(weights)),
    }
    pids = {name: _actor_pid(cluster, name) for name in ("gateway", "executor")}
    latencies: list[float] = []
    refusals: dict[str, float] = {}
    async with (
        AsyncClient(cluster.gateway, victim, timeout_s=30) as v,
        AsyncClient(cluster.gateway, attacker, timeout_s=30) as a,
    ):

        async def victim_load(until: trio.Event) -> None:
            while not until.is_set():
                t0 = trio.current_time()
                await v.infer("steady", max_tokens=2)
                latencies.append(trio.current_time() - t0)
                await trio.sleep(0.02)

        with trio.fail_after(120):
            baseline_done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(victim_load, baseline_done)
                await trio.sleep(2.0)
                baseline_done.set()
            baseline = sorted(latencies)
            latencies.clear()
            attack_done = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(victim_load, attack_done)
                for _ in range(3):
                    for name, (cfg_bytes, w) in hostile.items():
                        t0 = trio.current_time()
                        with pytest.raises(InvalidRequest):
                            await a.push_adapter_bytes(cfg_bytes, w, "evil")
                        refusals[name] = max(refusals.get(name, 0.0), trio.current_time() - t0)
                attack_done.set()
            assert await a.list_adapters() == []
    during = sorted(latencies)

    def p99(xs: list[float]) -> float:
        return xs[int(0.99 * (len(xs) - 1))]

    print(
        "refused in (max of 3): "
        + ", ".join(f"{k} {t * 1000:.0f} ms" for k, t in refusals.items())
        + f"; victim p99 {p99(baseline) * 1000:.1f} ms before, {p99(during) * 1000:.1f} ms during"
    )
    assert all(t < 1.0 for t in refusals.values()), refusals
    assert p99(during) < max(1.0, 5 * p99(baseline))
    assert {name: _actor_pid(cluster, name) for name in pids} == pids  # nobody restarted
    assert "exited with" not in cluster.full_log()


# --- a gateway killed mid-stream -------------------------------------------------------------


async def test_gateway_kill_crosses_no_tokens_and_bills_once(cluster: RunningCluster) -> None:
    """Runs last in this module: it restarts the gateway."""
    _, key_a = _tenant(cluster, "streamer")
    tenant_b, key_b = _tenant(cluster, "after")
    prompts = ["The river", "numbers: 1 2 3", "Why is the sky", "tea or coffee?"]
    expected = {p: transformers_greedy(cluster.model_dir, p, 8) for p in prompts}
    failures: list[VajraError] = []
    started = 0

    async def long_stream(c: AsyncClient) -> None:
        nonlocal started
        try:
            async with c.stream(
                "Once upon a time", max_tokens=LONG, ignore_eos=True, timeout_s=60
            ) as s:
                async for _ in s:
                    started += 1
                    await trio.lowlevel.checkpoint()
        except VajraError as exc:
            failures.append(exc)

    gateway_pid = _actor_pid(cluster, "gateway")
    async with AsyncClient(cluster.gateway, key_a, timeout_s=60) as a:
        with trio.fail_after(60):
            t_kill = 0.0
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(long_stream, a)
                while started < 100:  # noqa: ASYNC110 - counted by the stream tasks
                    await trio.sleep(0.05)
                os.kill(gateway_pid, signal.SIGKILL)
                t_kill = trio.current_time()
            failed_after = trio.current_time() - t_kill
    print(f"gateway killed: A's 20 streams failed {failed_after:.2f}s later ({failures[0]})")
    assert len(failures) == 20 and all(isinstance(e, UnavailableError) for e in failures)
    assert failed_after < 10, failed_after  # not the 60 s deadline

    # The supervisor restarts the gateway; tenant B's requests see only B's tokens.
    results: list[tuple[str, list[int]]] = []
    errors: list[BaseException] = []
    with trio.fail_after(120):
        while True:
            try:
                async with AsyncClient(cluster.gateway, key_b, timeout_s=5) as probe:
                    await probe.ping()
                break
            except VajraError:
                await trio.sleep(0.2)
        assert _actor_pid(cluster, "gateway") != gateway_pid

        async def one(c: AsyncClient, i: int) -> None:
            prompt = prompts[i % len(prompts)]
            try:
                if i % 2:
                    tokens: list[int] = []
                    async with c.stream(prompt, max_tokens=8) as s:
                        async for chunk in s:
                            tokens += chunk.token_ids
                else:
                    tokens = list((await c.infer(prompt, max_tokens=8)).tokens)
                results.append((prompt, tokens))
            except VajraError as exc:
                errors.append(exc)

        async with (
            AsyncClient(cluster.gateway, key_b, timeout_s=60) as b,
            trio.open_nursery() as nursery,
        ):
            for i in range(200):
                nursery.start_soon(one, b, i)
        async with AsyncClient(cluster.gateway, ADMIN_KEY) as admin:
            idle_s = await _wait_idle(admin, 15)  # A's orphaned rows were dropped, not run out
    print(f"after the restart: B's 200 requests answered; executor idle {idle_s:.2f}s later")
    assert errors == []
    assert len(results) == 200
    for prompt, tokens in results:
        assert tokens == expected[prompt][0], prompt  # B's own tokens, none of A's
    events = await _wait_billed(cluster, tenant_b, 200)
    assert len(events) == 200 and len({e["request_id"] for e in events}) == 200
    async with AsyncClient(cluster.gateway, key_b) as c:
        usage = await c.usage()
    assert usage.requests == 200
    assert usage.completion_tokens == sum(len(t) for _, t in results)
