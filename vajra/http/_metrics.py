"""The bridge's Prometheus metrics, in one registry per bridge (no module globals).

What is aggregated where:

- ``vajra_http_*``, the latency histograms and the token, GPU-millisecond and limit counters
  are this bridge process's view of the requests it served (sum them across bridges);
- ``vajra_executor_*`` gauges are cluster-wide: read from every live executor's heartbeat
  (through the gateway) when ``/metrics`` is scraped, labelled by executor;
- ``vajra_gateway_*`` gauges come from the gateway's counters, refreshed by the bridge's
  health probe.

Labels are bounded: route templates (not raw paths), status codes, executor ids, and
``target`` = ``base`` or ``adapter`` (never the adapter's name).

:class:`RequestMetrics` is the ASGI middleware that counts every HTTP answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vajra.client import ExecutorStatus, Usage
from vajra.policies.billing import billed_gpu_ms

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class BridgeMetrics:
    def __init__(self, *, billing_granularity_ms: int = 10) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.granularity_ms = billing_granularity_ms
        r = self.registry
        self.requests = Counter(
            "vajra_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "vajra_http_request_duration_seconds",
            "Time from request to the last byte of the answer (streams included)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "vajra_time_to_first_token_seconds",
            "Streams: time from request to the first generated text",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot_seconds = Histogram(
            "vajra_time_per_output_token_seconds",
            "Generation time per output token after the first (whole request for non-streams)",
            ["route"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e_seconds = Histogram(
            "vajra_request_end_to_end_seconds",
            "Generation requests: time from request to the final result",
            ["route", "target"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "vajra_queue_time_seconds",
            "Time a request waited between the gateway and an executor admitting it",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vajra_prompt_tokens", "Prompt tokens of finished requests", ["target"], registry=r
        )
        self.generated_tokens = Counter(
            "vajra_generated_tokens",
            "Generated tokens of finished requests",
            ["target"],
            registry=r,
        )
        self.gpu_ms = Counter(
            "vajra_gpu_milliseconds",
            "GPU time measured by the executors for finished requests",
            registry=r,
        )
        self.billed_gpu_ms = Counter(
            "vajra_billed_gpu_milliseconds",
            "GPU time billed: each request's GPU time rounded up to the billing granularity",
            registry=r,
        )
        self.limited = Counter(
            "vajra_http_limited_requests",
            "Requests refused by the gateway's per-tenant limits",
            ["reason"],
            registry=r,
        )
        self.gateway_up = Gauge(
            "vajra_gateway_up", "1 while the gateway answers the bridge's probe", registry=r
        )
        self.gateway_inflight = Gauge(
            "vajra_gateway_inflight_requests",
            "Requests in flight in the gateway, at its last probe",
            registry=r,
        )
        self.queue_depth = Gauge(
            "vajra_executor_queue_depth_requests",
            "Requests queued per executor (last heartbeat)",
            ["executor"],
            registry=r,
        )
        self.running = Gauge(
            "vajra_executor_running_requests",
            "Requests running per executor (last heartbeat)",
            ["executor"],
            registry=r,
        )
        self.resident = Gauge(
            "vajra_executor_resident_adapters",
            "Adapters resident in GPU memory per executor (last heartbeat)",
            ["executor"],
            registry=r,
        )
        self.free_memory = Gauge(
            "vajra_executor_free_memory_bytes",
            "Free accelerator memory per executor (last heartbeat)",
            ["executor"],
            registry=r,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_generation(
        self,
        route: str,
        *,
        adapter: bool,
        usage: Usage,
        e2e_s: float,
        ttft_s: float | None,
    ) -> None:
        target = "adapter" if adapter else "base"
        self.e2e_seconds.labels(route, target).observe(e2e_s)
        self.queue_seconds.observe(max(0.0, usage.queue_ms) / 1000.0)
        self.prompt_tokens.labels(target).inc(usage.prompt_tokens)
        self.generated_tokens.labels(target).inc(usage.completion_tokens)
        gpu_ms = max(0.0, usage.gpu_ms)
        self.gpu_ms.inc(gpu_ms)
        self.billed_gpu_ms.inc(billed_gpu_ms(gpu_ms, self.granularity_ms))
        n = usage.completion_tokens
        if ttft_s is not None:
            self.ttft_seconds.labels(route).observe(ttft_s)
            if n > 1:
                self.tpot_seconds.labels(route).observe(max(0.0, e2e_s - ttft_s) / (n - 1))
        elif n > 0:
            self.tpot_seconds.labels(route).observe(e2e_s / n)

    def set_executors(self, executors: list[ExecutorStatus]) -> None:
        for gauge in (self.queue_depth, self.running, self.resident, self.free_memory):
            gauge.clear()
        for e in executors:
            self.queue_depth.labels(e.executor_id).set(e.queue_depth)
            self.running.labels(e.executor_id).set(e.running)
            self.resident.labels(e.executor_id).set(e.resident_adapters)
            self.free_memory.labels(e.executor_id).set(e.free_memory_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: count each HTTP answer by route template, method and status."""

    def __init__(
        self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *, metrics: BridgeMetrics
    ) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(
                template, scope.get("method", ""), status, time.perf_counter() - t0
            )
