"""The executor's own Prometheus endpoint: adapter tiers, queue and batch, read at scrape time.

``executor.metrics_port`` > 0 serves ``/metrics`` on 127.0.0.1 (executor ``exec-N`` of a
``vajra up`` cluster listens on ``metrics_port + N``). The HTTP server is prometheus_client's
own, in a daemon thread, so scrapes never touch the Trio loop; values are read from the
executor's counters when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vajra.actors.adapter_tiers import LOAD_MS_BUCKETS, TIERS

if TYPE_CHECKING:
    from vajra.actors.executor import Executor


class ExecutorCollector(Collector):
    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def collect(self) -> Iterator[Metric]:
        ex = self.executor
        eid = ex.executor_id
        depth = GaugeMetricFamily(
            "vajra_executor_queue_depth",
            "Requests waiting (queued or loading an adapter)",
            labels=["executor"],
        )
        running = GaugeMetricFamily(
            "vajra_executor_running", "Rows in the running batch", labels=["executor"]
        )
        if ex.engine is not None:
            depth.add_metric([eid], ex._queue_depth())
            running.add_metric([eid], ex.engine.num_running())
        yield depth
        yield running
        completed = CounterMetricFamily(
            "vajra_executor_requests_completed",
            "Requests answered with a result",
            labels=["executor"],
        )
        completed.add_metric([eid], ex.counters.get("completed", 0))
        yield completed
        tiers = ex.tiers
        if tiers is None:
            return
        resident = GaugeMetricFamily(
            "vajra_executor_resident_adapters",
            "Adapters resident in the GPU pool",
            labels=["executor"],
        )
        resident.add_metric([eid], len(tiers.gpu))
        yield resident
        hits = CounterMetricFamily(
            "vajra_adapter_tier_hits", "Adapter found in tier", labels=["executor", "tier"]
        )
        misses = CounterMetricFamily(
            "vajra_adapter_tier_misses", "Adapter not in tier", labels=["executor", "tier"]
        )
        evictions = CounterMetricFamily(
            "vajra_adapter_tier_evictions",
            "Adapters evicted from tier",
            labels=["executor", "tier"],
        )
        load = HistogramMetricFamily(
            "vajra_adapter_load_seconds",
            "Time to bring an adapter up from each tier",
            labels=["executor", "tier"],
        )
        for tier in TIERS:
            st = tiers.stats[tier]
            hits.add_metric([eid, tier], st.hits)
            misses.add_metric([eid, tier], st.misses)
            evictions.add_metric([eid, tier], st.evictions)
            counts = dict(st.load_ms)
            cumulative, buckets = 0, []
            for bound in LOAD_MS_BUCKETS:
                cumulative += counts.get(bound, 0)
                label = "+Inf" if bound == float("inf") else repr(bound / 1000.0)
                buckets.append((label, cumulative))
            load.add_metric([eid, tier], buckets, st.load_ms_sum / 1000.0)
        yield hits
        yield misses
        yield evictions
        yield load


def serve_executor_metrics(executor: Executor, port: int) -> CollectorRegistry:
    """Start the endpoint on 127.0.0.1:``port`` (a daemon thread); returns its registry."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExecutorCollector(executor))
    start_http_server(port, addr="127.0.0.1", registry=registry)
    return registry
