"""Limits and failure answers: the gateway's per-tenant limits as 429 with Retry-After through
the bridge, slow clients cut off, and 503 at once when the gateway is down.

Test rules: loopback only; port 0 for every bridge started here; everything under
`trio.fail_after`.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from tests.inprocess import inprocess_config
from vajra.actors.executor import Executor
from vajra.actors.gateway import Gateway
from vajra.actors.scheduler import Scheduler
from vajra.client import AsyncClient
from vajra.config import VajraConfig
from vajra.errors import RateLimited
from vajra.http import HttpBridge
from vajra.state import ClusterState


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def _bridge(cfg: VajraConfig) -> AsyncIterator[str]:
    bridge = HttpBridge(cfg)
    async with trio.open_nursery() as nursery:
        address: str = await nursery.start(bridge.run)
        try:
            yield address
        finally:
            await bridge.drain()
            nursery.cancel_scope.cancel()


async def test_a_down_gateway_is_answered_503_at_once() -> None:
    cfg = (
        VajraConfig()
        .replace("cluster", gateway_address=f"tcp://127.0.0.1:{_free_port()}", model="")
        .replace("http", port=0, health_interval_s=0.1, health_timeout_s=0.3)
    )
    with trio.fail_after(30):
        async with _bridge(cfg) as address, httpx.AsyncClient(base_url=address, timeout=10) as http:
            h = {"Authorization": "Bearer vk_anything"}
            t0 = trio.current_time()
            r = await http.post("/v1/completions", json={"model": "base", "prompt": "x"}, headers=h)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "unavailable"
            r = await http.post(
                "/v1/models/base/infer", json={"prompt": "x", "stream": True}, headers=h
            )
            assert r.status_code == 503
            assert trio.current_time() - t0 < 2.0
            assert (await http.get("/healthz")).json()["gateway"] == "down"
            metrics = (await http.get("/metrics")).text
            assert "vajra_gateway_up 0.0" in metrics


@asynccontextmanager
async def _cluster_in_process(cfg: VajraConfig) -> AsyncIterator[str]:
    """Scheduler, a model-less executor and the gateway in this Trio run; yields the gateway."""
    with ClusterState(cfg.cluster.redis_url) as state:
        async with trio.open_nursery() as nursery:
            await nursery.start(Scheduler(cfg).run)
            await nursery.start(Executor(cfg, state, executor_id="exec-0", model="null").run)
            address: str = await nursery.start(Gateway(cfg, state).run)
            yield address
            nursery.cancel_scope.cancel()


async def test_a_train_body_may_hold_a_dataset_larger_than_other_bodies() -> None:
    """The train route's body limit follows ``training.max_dataset_bytes`` (twice it, plus
    64 KiB); every other route keeps ``http.max_body_bytes``. With no gateway, a body the
    limit lets through is answered 503, one over it 413."""
    cfg = (
        VajraConfig()
        .replace("cluster", gateway_address=f"tcp://127.0.0.1:{_free_port()}", model="")
        .replace("http", port=0, health_interval_s=0.1, health_timeout_s=0.3)
        .replace("training", max_dataset_bytes=1 << 20)
    )
    line = '{"prompt": "2+2=", "completion": " 4"}\n'
    dataset = line * ((3 << 19) // len(line))  # 1.5 MiB: over http.max_body_bytes (1 MiB)
    h = {"Authorization": "Bearer vk_anything"}
    with trio.fail_after(60):
        async with _bridge(cfg) as address, httpx.AsyncClient(base_url=address, timeout=30) as http:
            r = await http.post("/v1/models/bot/train", json={"dataset": dataset}, headers=h)
            assert r.status_code == 503, r.text  # through the limit, to the absent gateway
            r = await http.post("/v1/models/bot/train", json={"dataset": dataset * 2}, headers=h)
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
            body = {"model": "base", "prompt": dataset}
            r = await http.post("/v1/completions", json=body, headers=h)
            assert r.status_code == 413, r.text
            r = await http.post("/v1/models/bot/train/x", json={"dataset": dataset}, headers=h)
            assert r.status_code == 413, r.text  # the pattern matches the route only


async def test_the_gateways_tenant_limits_answer_429_with_retry_after(
    tmp_path: Path, valkey_url: str
) -> None:
    cfg = (
        inprocess_config(tmp_path / "run", valkey_url)
        .replace("gateway", tenant_rate_limit_per_s=0.2, tenant_rate_limit_burst=3)
        .replace("http", port=0, base_model_name="null")
    )
    with ClusterState(valkey_url) as s:
        _, key = s.tenants.create(f"lim{uuid.uuid4().hex[:8]}")
        _, other = s.tenants.create(f"lim{uuid.uuid4().hex[:8]}")
    body = {"model": "null", "prompt": "limit", "max_tokens": 1}
    with trio.fail_after(60):
        async with _cluster_in_process(cfg) as gateway:
            bridge_cfg = cfg.replace("cluster", gateway_address=gateway)
            async with (
                _bridge(bridge_cfg) as address,
                httpx.AsyncClient(base_url=address, timeout=30) as http,
            ):
                h = {"Authorization": f"Bearer {key}"}
                codes = [
                    (await http.post("/v1/completions", json=body, headers=h)).status_code
                    for _ in range(4)
                ]
                assert codes == [200, 200, 200, 429]
                r = await http.post("/v1/completions", json=body, headers=h)
                assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "rate_limited"
                r = await http.post(
                    "/v1/models/null/infer", json={"prompt": "x", "stream": True}, headers=h
                )
                assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
                # Another tenant has its own budget.
                h2 = {"Authorization": f"Bearer {other}"}
                r = await http.post("/v1/completions", json=body, headers=h2)
                assert r.status_code == 200
                assert 'vajra_http_limited_requests_total{reason="rate_limited"} 3.0' in (
                    (await http.get("/metrics")).text
                )
            # The same limits hold for a ZeroMQ client: no way around them.
            async with AsyncClient(gateway, key, timeout_s=10) as c:
                with pytest.raises(RateLimited) as info:
                    await c.infer("x", max_tokens=1)
                assert info.value.retriable and info.value.retry_after_s > 0


async def _slow_client(address: str, request: bytes, pause_s: float, until: float) -> float:
    """Send ``request`` one byte at a time; return when the server closed the connection
    (seconds after the start), or ``until`` if it never did."""
    host, port = address.removeprefix("http://").rsplit(":", 1)
    t0 = trio.current_time()
    stream = await trio.open_tcp_stream(host, int(port))
    try:
        for i in range(len(request)):
            if trio.current_time() - t0 > until:
                return until
            try:
                await stream.send_all(request[i : i + 1])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return trio.current_time() - t0
            with trio.move_on_after(pause_s):
                if await stream.receive_some(65536) == b"":
                    return trio.current_time() - t0
        with trio.move_on_after(until):
            while await stream.receive_some(65536) != b"":
                pass
        return trio.current_time() - t0
    except (trio.BrokenResourceError, OSError):
        return trio.current_time() - t0
    finally:
        await stream.aclose()


async def test_slow_headers_and_slow_bodies_are_cut_off() -> None:
    """Slowloris: 40 connections trickling headers and 40 trickling a body are all closed
    within the configured times, and the bridge still answers a normal request."""
    cfg = (
        VajraConfig()
        .replace("cluster", gateway_address=f"tcp://127.0.0.1:{_free_port()}", model="")
        .replace("http", port=0, idle_timeout_s=1.5, body_timeout_s=1.5)
    )
    slow_headers = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
    slow_body = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer vk_x\r\nContent-Length: 500\r\n\r\n" + b" " * 500
    )
    closed: list[float] = []

    async def one(request: bytes) -> None:
        closed.append(await _slow_client(address, request, pause_s=0.2, until=20.0))

    with trio.fail_after(60):
        async with _bridge(cfg) as address:
            async with trio.open_nursery() as nursery:
                for _ in range(40):
                    nursery.start_soon(one, slow_headers)
                    nursery.start_soon(one, slow_body)
            async with httpx.AsyncClient(base_url=address, timeout=10) as http:
                assert (await http.get("/healthz")).status_code == 200
    assert len(closed) == 80
    assert max(closed) < 10.0, sorted(closed)[-5:]
