"""Limits and failure answers: per-tenant rate and concurrency limits (pure, fake clock), 429
with Retry-After through a bridge with tight limits, and 503 at once when the gateway is down.

Test rules: loopback only; port 0 for every bridge started here; everything under
`trio.fail_after`.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from tests.e2e.harness import RunningCluster
from vajra.config import VajraConfig
from vajra.http import HttpBridge, TenantLimits
from vajra.http._errors import ApiError


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_its_rate() -> None:
    clock = FakeClock()
    limits = TenantLimits(rate_per_s=2.0, burst=3, max_concurrent=100, clock=clock)
    for _ in range(3):
        limits.acquire("a")
        limits.release("a")
    with pytest.raises(ApiError) as info:
        limits.acquire("a")
    assert info.value.status == 429 and info.value.code == "rate_limited"
    assert info.value.headers["Retry-After"] == "1"
    limits.acquire("b")  # another tenant has its own bucket
    clock.now += 0.5  # one token back at 2/s
    limits.acquire("a")
    with pytest.raises(ApiError):
        limits.acquire("a")


def test_concurrency_limit_counts_requests_in_flight() -> None:
    limits = TenantLimits(rate_per_s=1000.0, burst=1000, max_concurrent=2, clock=FakeClock())
    limits.acquire("a")
    with limits.slot("a"):
        with pytest.raises(ApiError) as info:
            limits.acquire("a")
        assert info.value.code == "concurrency_limited" and info.value.status == 429
    assert limits.inflight("a") == 1
    limits.acquire("a")
    assert limits.inflight("a") == 2


def test_idle_tenants_are_forgotten_when_the_table_is_full() -> None:
    clock = FakeClock()
    limits = TenantLimits(rate_per_s=1.0, burst=1, max_concurrent=1, clock=clock, max_tenants=2)
    with limits.slot("a"):
        pass
    limits.acquire("b")
    clock.now += 10
    limits.acquire("c")  # prunes "a" (idle, full); keeps "b" (in flight)
    assert limits.inflight("b") == 1 and limits.inflight("a") == 0


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


@pytest.mark.e2e
async def test_tight_limits_answer_429_with_retry_after(
    http_cluster: RunningCluster, tenant: tuple[str, str], model_name: str
) -> None:
    cfg = (
        VajraConfig()
        .replace("cluster", gateway_address=http_cluster.gateway, model="")
        .replace("http", port=0, rate_limit_per_s=0.2, rate_limit_burst=3, base_model_name="tiny")
    )
    h = {"Authorization": f"Bearer {tenant[1]}"}
    body = {"model": "tiny", "prompt": "limit", "max_tokens": 1}
    with trio.fail_after(60):
        async with _bridge(cfg) as address, httpx.AsyncClient(base_url=address, timeout=30) as http:
            codes = [
                (await http.post("/v1/completions", json=body, headers=h)).status_code
                for _ in range(4)
            ]
            assert codes == [200, 200, 200, 429]
            r = await http.post("/v1/completions", json=body, headers=h)
            assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "rate_limited"
            r = await http.post(
                "/v1/models/tiny/infer", json={"prompt": "x", "stream": True}, headers=h
            )
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
