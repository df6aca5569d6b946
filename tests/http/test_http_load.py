"""Load: 200 concurrent streaming clients through the bridge, and the bridge's overhead per
request over calling the SDK directly (printed; run with -s to see it).

Test rules: loopback only; everything under `trio.fail_after`.
"""

from __future__ import annotations

import json
import statistics

import httpx
import pytest
import trio

from tests.e2e.harness import RunningCluster
from vajra.client import AsyncClient

pytestmark = pytest.mark.e2e

PROMPTS = ["The river", "Once upon a time", "numbers: 1 2 3", "hello", "Why is the sky"]


async def test_200_concurrent_streaming_clients(
    base_url: str, tenant: tuple[str, str], model_name: str
) -> None:
    h = {"Authorization": f"Bearer {tenant[1]}"}
    texts: dict[int, str] = {}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": model_name,
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with http.stream("POST", "/v1/completions", json=body, headers=h) as r:
            assert r.status_code == 200, await r.aread()
            data = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]", data
        events = [json.loads(d) for d in data[:-1]]
        assert not [e for e in events if "error" in e], events
        assert events[-1]["usage"]["completion_tokens"] >= 1
        texts[i] = "".join(e["choices"][0]["text"] for e in events if e["choices"])

    with trio.fail_after(240):
        async with (
            httpx.AsyncClient(base_url=base_url, timeout=180, limits=limits) as http,
            trio.open_nursery() as nursery,
        ):
            for i in range(200):
                nursery.start_soon(one, http, i)
    assert len(texts) == 200
    # Greedy decoding: the same prompt gives the same text, whatever else shared its batch.
    for i, text in texts.items():
        assert text == texts[i % len(PROMPTS)], i


async def test_bridge_overhead_over_the_sdk(
    http_cluster: RunningCluster, base_url: str, tenant: tuple[str, str], model_name: str
) -> None:
    """Median latency of one 1-token completion, sequentially: HTTP bridge vs the SDK."""
    key = tenant[1]
    n = 60
    sdk_s: list[float] = []
    http_s: list[float] = []
    body = {"model": model_name, "prompt": "overhead", "max_tokens": 1, "temperature": 0}
    with trio.fail_after(120):
        async with (
            AsyncClient(http_cluster.gateway, key, timeout_s=30) as sdk,
            httpx.AsyncClient(
                base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {key}"}
            ) as http,
        ):
            for _ in range(5):  # warm up connections, caches and the model
                await sdk.infer("overhead", max_tokens=1)
                assert (await http.post("/v1/completions", json=body)).status_code == 200
            for _ in range(n):
                t0 = trio.current_time()
                await sdk.infer("overhead", max_tokens=1)
                t1 = trio.current_time()
                r = await http.post("/v1/completions", json=body)
                t2 = trio.current_time()
                assert r.status_code == 200
                sdk_s.append(t1 - t0)
                http_s.append(t2 - t1)
    sdk_ms = statistics.median(sdk_s) * 1000
    http_ms = statistics.median(http_s) * 1000
    print(
        f"\nbridge overhead: median {http_ms - sdk_ms:.2f} ms per request "
        f"(HTTP {http_ms:.2f} ms, SDK {sdk_ms:.2f} ms, n={n}, 1-token completions)"
    )
    assert http_ms - sdk_ms < 100.0
