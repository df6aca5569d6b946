"""Each actor's own Prometheus endpoint, read at scrape time.

``vajra actor NAME --metrics-port P`` serves ``/metrics`` on 127.0.0.1:P. Under ``vajra up``,
``cluster.metrics_port`` > 0 gives each actor its port: gateway +0, scheduler +1, predictor +2,
ledger +3, executor ``exec-N`` +10+N (the HTTP bridge has its own ``/metrics``). Every actor
exports its counters as ``vajra_actor_events_total{actor, event}``; the executor adds its
queue, batch and adapter tiers; the ledger what it billed (``vajra_billed_gpu_ms_total{kind}``,
``vajra_billed_gradients_total``, ``vajra_billed_events_total{kind}``: fresh events only,
since the ledger started). The server is prometheus_client's own, in a daemon thread, so
scrapes never touch the Trio loop.
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
    from vajra.actors.base import Actor
    from vajra.actors.executor import Executor
    from vajra.actors.ledger import Ledger


class CountersCollector(Collector):
    """An actor's ``counters`` (a Counter of event name -> count), as one labelled family."""

    def __init__(self, actor: Actor) -> None:
        self.actor = actor

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "vajra_actor_events", "Events counted by an actor", labels=["actor", "event"]
        )
        name = getattr(self.actor, "executor_id", self.actor.name)
        for event, count in list(getattr(self.actor, "counters", {}).items()):
            family.add_metric([name, event], count)
        yield family


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
            depth.add_metric([eid], ex.queue_depth())
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


class LedgerCollector(Collector):
    """What the ledger billed: GPU milliseconds and events by kind, gradients."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterator[Metric]:
        billing = dict(self.ledger.billing)
        billed = CounterMetricFamily(
            "vajra_billed_gpu_ms",
            "GPU milliseconds billed (rounded up per request to the billing granularity)",
            labels=["kind"],
        )
        events = CounterMetricFamily(
            "vajra_billed_events", "Usage events recorded (each once)", labels=["kind"]
        )
        for kind in ("inference", "training"):
            billed.add_metric([kind], billing.get(f"billed_ms_{kind}", 0))
            events.add_metric([kind], billing.get(f"events_{kind}", 0))
        yield billed
        yield events
        yield CounterMetricFamily(
            "vajra_billed_gradients",
            "Gradients billed (trainable parameters x optimizer steps)",
            value=billing.get("gradients", 0),
        )


def serve_actor_metrics(actor: Actor, port: int) -> CollectorRegistry:
    """Start ``actor``'s endpoint on 127.0.0.1:``port`` (a daemon thread); returns its registry."""
    from vajra.actors.executor import Executor
    from vajra.actors.ledger import Ledger

    registry = CollectorRegistry(auto_describe=False)
    registry.register(CountersCollector(actor))
    if isinstance(actor, Executor):
        registry.register(ExecutorCollector(actor))
    if isinstance(actor, Ledger):
        registry.register(LedgerCollector(actor))
    start_http_server(port, addr="127.0.0.1", registry=registry)
    return registry
