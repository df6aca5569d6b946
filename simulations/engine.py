# Over 400 lines: the event loop and every event it handles (arrivals, completions, retries,
# joins, ticks) read together; each event is a few lines and only makes sense beside the loop.
"""The discrete-event engine: requests arrive from a columnar trace, events come off one heap.

Events are small classes that handle themselves and return the next events (Vidur's shape);
entities (:mod:`simulations.cluster`) are plain data; one :class:`MetricsStore` keeps every
figure. Arrivals are read from the trace's numpy columns in chunks and merged with the heap, so
a request costs one heap entry (its completion) and no arrival object.

Continuous batching at request granularity: a request that finds a free batch seat starts at
once (else it queues, FIFO); it waits for its adapter's load if the adapter is not ready in GPU
memory (a cold start), then its prompt is prefilled (``prefill_ms_base + prefill_ms_per_token x
prompt``) and it emits one token per decode iteration, whose time (``decode_ms_base +
decode_ms_per_seq x b``) is fixed by the batch size b at its start. That approximation keeps one
event per request; it is exact when the batch size does not change during a request. Both times
are multiplied by ``costs.adapter_compute_factor`` (the LoRA's own compute), and
``costs.serving_ms`` (the serving path outside the engine) is added to each request's latencies.
A cluster of CPU executors (``host.cores`` > 0) also shares the machine's cores with the serving
path: each request's times are stretched by :func:`simulations.host.slowdown` when it starts.

Provisioning (``ProvisionNewGPU``): with ``cluster.max_executors`` above ``executors``, a
request that finds no room asks :class:`vajra.policies.provisioning.CapacityProvisioner` (the
scheduler's); a ``start`` adds an empty executor ``cluster.executor_start_ms`` later
(:class:`ExecutorJoins`), one start at a time, and the waiting requests find it at their next
retry. A joined executor is paid from when it joined until the end, or until it leaves: with
``cluster.idle_stop_ms``, one that has had no request for that long leaves (:class:`IdleCheck`;
the executors the run started with never do), as ``vajra up`` stops idle executors it started.

Cancellation: :meth:`Simulator.run` is synchronous; interrupting it (KeyboardInterrupt) leaves
the metrics store with the requests finished so far and the rest marked unfinished.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from simulations.cluster import DISK, GPU, HOST, REMOTE, Executor, TierTimes, new_executor
from simulations.config import SimConfig
from simulations.host import slowdown
from simulations.metrics import NO_CAPACITY, MetricsStore, cold_breakdown
from simulations.placement import SimPlacement
from vajra.policies.billing import billed_gpu_ms, inference_cost_usd
from vajra.policies.provisioning import CapacityProvisioner, ProvisionAction

Request = tuple[int, float, int, int, int]  # (index, arrival ms, adapter, prompt, output tokens)
CHUNK = 1 << 16


class TraceColumns(Protocol):
    """The columns the engine reads (``vajra.traces.Trace`` has them)."""

    t_ms: Any  # float64[n], sorted
    source: Any  # int32[n]: the adapter index, after vajra.traces.map_to_adapters
    prompt_tokens: Any  # int32[n]
    output_tokens: Any  # int32[n]

    def __len__(self) -> int: ...


class Prefetch(Protocol):
    """The engine's side of a prefetch policy (see :mod:`simulations.prefetch`)."""

    def on_arrival(self, adapter: int, ex: Executor, now_ms: float) -> None: ...

    def plan(self, sim: Simulator, now_ms: float) -> None: ...

    def on_load(self, src_tier: int, nbytes: int, ms: float) -> None: ...

    def on_evicted(self, adapter: int, ex: Executor, tier: int) -> None: ...

    def report(self, now_ms: float) -> dict[str, Any]: ...

    def start_measuring(self) -> None: ...

    def bind(self, sim: Simulator) -> None: ...


class Event:
    __slots__ = ("t_ms",)

    def __init__(self, t_ms: float) -> None:
        self.t_ms = t_ms

    def handle(self, sim: Simulator) -> Iterable[Event]:
        raise NotImplementedError


class RequestDone(Event):
    """A request's last token: frees its batch seat and starts the next queued request."""

    __slots__ = ("adapter", "ex")

    def __init__(self, t_ms: float, ex: Executor, adapter: int) -> None:
        self.t_ms = t_ms
        self.ex = ex
        self.adapter = adapter

    def handle(self, sim: Simulator) -> Iterable[Event]:
        ex, adapter = self.ex, self.adapter
        ex.running -= 1
        left = ex.in_use[adapter] - 1
        if left:
            ex.in_use[adapter] = left
        else:
            del ex.in_use[adapter]
        if ex.queue:
            done = sim.start(ex, ex.queue.popleft(), self.t_ms)
            return (done,)
        if not ex.running:
            ex.idle_since_ms = self.t_ms
        sim.placement.load_changed(ex)
        return ()


class RetryPlacement(Event):
    """A request no executor could take asks placement again, until ``run.max_wait_ms``."""

    __slots__ = ("request",)

    def __init__(self, t_ms: float, request: Request) -> None:
        self.t_ms = t_ms
        self.request = request

    def handle(self, sim: Simulator) -> Iterable[Event]:
        return sim.place(self.request, self.t_ms)


class ExecutorJoins(Event):
    """A GPU the provisioner started (``cluster.max_executors``) joins and takes requests."""

    __slots__ = ()

    def handle(self, sim: Simulator) -> Iterable[Event]:
        sim.add_executor(self.t_ms)
        stop_ms = sim.cfg.cluster.idle_stop_ms
        if stop_ms > 0 and not sim.idle_watch:
            sim.idle_watch = True
            return (IdleCheck(self.t_ms + stop_ms / 4),)
        return ()


class IdleCheck(Event):
    """Every ``cluster.idle_stop_ms`` / 4: provisioned GPUs idle that long leave."""

    __slots__ = ()

    def handle(self, sim: Simulator) -> Iterable[Event]:
        stop_ms = sim.cfg.cluster.idle_stop_ms
        for ex in sim.executors:
            since = ex.idle_since_ms
            if (
                ex.joined_ms > -math.inf
                and ex.retired_ms == math.inf
                and since is not None
                and self.t_ms - since >= stop_ms
            ):
                sim.retire(ex, self.t_ms)
        if sim.more_work():
            return (IdleCheck(self.t_ms + stop_ms / 4),)
        sim.idle_watch = False
        return ()


class SampleTick(Event):
    """Samples tenants per GPU while there is work left."""

    __slots__ = ()

    def handle(self, sim: Simulator) -> Iterable[Event]:
        sim.metrics.sample(self.t_ms, sim.serving())
        if sim.more_work():
            return (SampleTick(self.t_ms + sim.cfg.run.sample_every_ms),)
        return ()


class PrefetchTick(Event):
    """Runs the prefetch policy's plan (Algorithm 1) while arrivals remain."""

    __slots__ = ()

    def handle(self, sim: Simulator) -> Iterable[Event]:
        assert sim.prefetch is not None
        sim.prefetch.plan(sim, self.t_ms)
        if sim.next_arrival < sim.n:
            return (PrefetchTick(self.t_ms + sim.cfg.policy.tick_ms),)
        return ()


class WarmupEnd(Event):
    """The end of ``trace.warmup_s``: the figures restart from zero; the tiers, placement and
    predictors keep what the warm-up taught them."""

    __slots__ = ()

    def handle(self, sim: Simulator) -> Iterable[Event]:
        sim.end_warmup(self.t_ms)
        return ()


class Simulator:
    """One run over one trace. Build it, call :meth:`run`, read :attr:`metrics`."""

    def __init__(
        self,
        cfg: SimConfig,
        trace: TraceColumns,
        executors: list[Executor],
        placement: SimPlacement,
        *,
        tenant_of: Callable[[int], int] = lambda adapter: adapter,
        prefetch: Prefetch | None = None,
    ) -> None:
        self.cfg = cfg
        self.trace = trace
        self.executors = executors
        self.placement = placement
        self.prefetch = prefetch
        self.tenant_of = tenant_of
        self.times = TierTimes.from_cluster(cfg.cluster)
        self.n = len(trace)
        self.metrics = MetricsStore(self.n)
        self.next_arrival = 0
        self.heap: list[tuple[float, int, Event]] = []
        self._seq = itertools.count()
        self.now_ms = 0.0
        c = cfg.costs
        f = c.adapter_compute_factor  # every simulated request runs with its adapter
        self._prefill = (c.prefill_ms_base * f, c.prefill_ms_per_token * f)
        self._decode = (c.decode_ms_base * f, c.decode_ms_per_seq * f)
        # a constant delay outside the engine: shifting every arrival by it changes no
        # executor's schedule, so it is added to each request's latencies alone
        self._serving_ms = c.serving_ms
        self._host = cfg.host
        e = cfg.economics
        self._bill = (e.billing_granularity_ms, e.gpu_price_per_hour, e.tenancy_factor)
        self._bytes = cfg.cluster.adapter_bytes
        self._prefetched: dict[tuple[int, int], None] = {}  # (executor, adapter) loads not yet used
        self._billed_ms = 0  # every request's GPU time, rounded up to the billing granularity
        self.warmup_ms = cfg.trace.warmup_s * 1000.0  # on the replayed trace's clock
        self.measure_from_ms: float | None = None
        self.span_ms = 0.0
        self.alive_ms: list[float] = []
        self.max_serving = len(executors)
        self.idle_watch = False  # an IdleCheck is scheduled
        if prefetch is not None:
            prefetch.bind(self)
        # ProvisionNewGPU: vajra.policies.provisioning's provisioner, unchanged. A simulated
        # start never fails, so it stays pending until its GPU joins.
        cl = cfg.cluster
        self.provisioner: CapacityProvisioner | None = None
        if cl.max_executors > len(executors):
            self.provisioner = CapacityProvisioner(
                allow_start=True,
                max_executors=cl.max_executors,
                max_wait_ms=cfg.run.max_wait_ms,
                start_ms=math.inf,
            )
            self.provisioner.set_running(cl.base_model, len(executors))

    def end_warmup(self, t_ms: float) -> None:
        """Requests arriving from ``t_ms`` on are measured; every counter restarts."""
        first = int(self.trace.t_ms.searchsorted(t_ms, side="left"))
        self.metrics.start_measuring(first, self.executors)
        self._billed_ms = 0
        self.measure_from_ms = t_ms
        if self.prefetch is not None:
            self.prefetch.start_measuring()

    # -- scheduling -------------------------------------------------------------------------
    def push(self, events: Iterable[Event]) -> None:
        for ev in events:
            heapq.heappush(self.heap, (ev.t_ms, next(self._seq), ev))

    def more_work(self) -> bool:
        return self.next_arrival < self.n or any(ex.load for ex in self.executors)

    # -- requests ---------------------------------------------------------------------------
    def place(self, req: Request, now_ms: float) -> Iterable[Event]:
        """Send ``req`` to the executor placement picks; wait (bounded) when none can take it."""
        adapter = req[2]
        tenant = self.tenant_of(adapter)
        target = self.placement.choose(adapter, tenant, now_ms)
        if target is None:
            prov = self.provisioner
            if prov is not None:
                decision = prov.provision(
                    self.cfg.cluster.base_model, now_ms, waiting_since_ms=req[1]
                )
                if decision.action == ProvisionAction.START:
                    self.push((ExecutorJoins(now_ms + self.cfg.cluster.executor_start_ms),))
            if now_ms - req[1] + self.cfg.run.retry_every_ms > self.cfg.run.max_wait_ms:
                self.metrics.fail(req[0], NO_CAPACITY)
                return ()
            return (RetryPlacement(now_ms + self.cfg.run.retry_every_ms, req),)
        ex = self.executors[target]
        self.placement.placed(adapter, tenant, ex, now_ms)
        if self.prefetch is not None:
            self.prefetch.on_arrival(adapter, ex, now_ms)
        if ex.running < ex.max_batch:
            return (self.start(ex, req, now_ms),)
        ex.queue.append(req)
        self.placement.load_changed(ex)
        return ()

    def add_executor(self, now_ms: float) -> Executor:
        """A provisioned GPU joins at ``now_ms``: empty tiers, the configured capacities."""
        ex = new_executor(self.cfg.cluster, len(self.executors), joined_ms=now_ms)
        ex.pick_victim = self.executors[0].pick_victim if self.executors else None
        self.executors.append(ex)
        self.placement.add_executor(ex)
        if self.provisioner is not None:
            base = self.cfg.cluster.base_model
            self.provisioner.started(base)
            self.provisioner.set_running(base, len(self.serving()))
        self.max_serving = max(self.max_serving, len(self.serving()))
        return ex

    def retire(self, ex: Executor, now_ms: float) -> None:
        """An idle provisioned GPU leaves at ``now_ms``: placement forgets it, it is paid until
        then, and the provisioner may start another."""
        ex.retired_ms = now_ms
        self.placement.remove_executor(ex)
        if self.provisioner is not None:
            self.provisioner.set_running(self.cfg.cluster.base_model, len(self.serving()))

    def serving(self) -> list[Executor]:
        """The executors that have not left."""
        return [ex for ex in self.executors if ex.retired_ms == math.inf]

    def start(self, ex: Executor, req: Request, now_ms: float) -> RequestDone:
        """Give ``req`` a batch seat on ``ex`` at ``now_ms``; its completion event."""
        i, t_arr, adapter, prompt, output = req
        ex.idle_since_ms = None
        ex.running += 1
        b = ex.running
        prefill_ms = self._prefill[0] + self._prefill[1] * prompt
        it_ms = self._decode[0] + self._decode[1] * b
        serving = self._serving_ms
        s = 1.0
        if self._host.cores:  # a CPU cluster: every process shares the machine's cores
            s = self._contention(ex, now_ms, serving + prefill_ms + (output - 1) * it_ms)
            prefill_ms, it_ms, serving = prefill_ms * s, it_ms * s, serving * s
        gpu = ex.gpu
        ready = gpu.get(adapter)
        if ready is None:
            prefetch = self.prefetch
            src = ex.tier_of(adapter) if prefetch is not None else REMOTE
            ready = ex.load_to_gpu(adapter, now_ms, self.times, self._bytes, stretch=s)
            if prefetch is not None:
                prefetch.on_load(src, self._bytes, self.times.load_ms[src])
            self.report_changes(ex)
        else:
            gpu[adapter] = gpu.pop(adapter)  # most recently used
            if self._prefetched and (ex.index, adapter) in self._prefetched:
                del self._prefetched[(ex.index, adapter)]
                self.metrics.prefetch_loads_used += 1
        cold = ready > t_arr
        if ready < now_ms:
            ready = now_ms
        ex.in_use[adapter] = ex.in_use.get(adapter, 0) + 1
        ex.served.add(adapter)
        first = ready + prefill_ms
        end = first + (output - 1) * it_ms if output > 1 else first
        ex.mark_busy(ready, end)
        metrics = self.metrics
        metrics.finish(i, first - t_arr + serving, end - t_arr + serving, cold)
        gpu_ms = end - ready
        metrics.gpu_ms_total += gpu_ms
        # billing is linear in the billed ms: each request is rounded up here, priced once at
        # the end (inference_cost_usd of the sum equals the sum of each request's price)
        self._billed_ms += billed_gpu_ms(gpu_ms, self._bill[0])
        self.placement.load_changed(ex)
        return RequestDone(end, ex, adapter)

    def _contention(self, ex: Executor, at_ms: float, nominal_ms: float) -> float:
        """:func:`simulations.host.slowdown` of a request given a seat on ``ex`` at ``at_ms``
        (O(executors): for the small CPU clusters ``[host]`` describes)."""
        h = self._host
        return slowdown(
            cores=h.cores,
            computing=sum(1 for e in self.executors if e is ex or e.busy_until_ms > at_ms),
            inflight=sum(e.running for e in self.executors),
            serving_cpu_ms=h.serving_cpu_ms,
            nominal_ms=nominal_ms,
            background_cores=h.background_cores,
        )

    def report_changes(self, ex: Executor) -> None:
        """Tell placement (and prefetch) of the tier changes ``ex`` recorded."""
        changes = ex.changes
        if changes:
            self.placement.residencies_changed(ex, changes)
            prefetch = self.prefetch
            if prefetch is not None:  # it reads no placement state: the order does not matter
                for adapter, tier in changes:
                    if tier > GPU:
                        prefetch.on_evicted(adapter, ex, tier)
                        self._prefetched.pop((ex.index, adapter), None)
            changes.clear()

    # -- tier commands (the prefetch policy calls these) -------------------------------------
    def promote(self, ex: Executor, adapter: int, tier: int, now_ms: float) -> bool:
        """Bring ``adapter`` up to ``tier`` on ``ex`` ahead of demand; False if already there
        (or ``ex`` has left)."""
        have = ex.tier_of(adapter)
        if have <= tier or ex.retired_ms != math.inf:
            return False
        if tier == GPU:
            ex.load_to_gpu(adapter, now_ms, self.times, self._bytes)
            self._prefetched[(ex.index, adapter)] = None
        else:
            ex.stage(adapter, tier)
            ex.loads += 1
            ex.bytes_loaded += self._bytes
        self.metrics.prefetch_loads += 1
        self.metrics.prefetch_bytes += self._bytes
        self.report_changes(ex)
        return True

    def demote(self, ex: Executor, adapter: int, tier: int) -> bool:
        """Move ``adapter`` down to ``tier`` on ``ex``; False when in use or already lower."""
        if ex.tier_of(adapter) >= tier or not ex.demote(adapter, tier):
            return False
        self._prefetched.pop((ex.index, adapter), None)
        self.report_changes(ex)
        return True

    # -- the loop ---------------------------------------------------------------------------
    def run(self, progress: Callable[[int], None] | None = None) -> MetricsStore:
        """Simulate every arrival to the end; ``progress(arrivals_done)`` is called every chunk."""
        trace, heap, push, pop = self.trace, self.heap, self.push, heapq.heappop
        heappush, seq, place = heapq.heappush, self._seq, self.place
        if self.n:
            self.now_ms = float(trace.t_ms[0])
            push((SampleTick(self.now_ms),))
            if self.prefetch is not None:
                push((PrefetchTick(self.now_ms),))
            if self.warmup_ms > 0:
                push((WarmupEnd(self.warmup_ms),))
        for lo in range(0, self.n, CHUNK):
            hi = min(self.n, lo + CHUNK)
            ts = trace.t_ms[lo:hi].tolist()
            ads = trace.source[lo:hi].tolist()
            ps = trace.prompt_tokens[lo:hi].tolist()
            os_ = trace.output_tokens[lo:hi].tolist()
            for k in range(hi - lo):  # push() inlined: one call less per event
                t = ts[k]
                while heap and heap[0][0] <= t:
                    ev_t, _, ev = pop(heap)
                    self.now_ms = ev_t
                    for nxt in ev.handle(self):
                        heappush(heap, (nxt.t_ms, next(seq), nxt))
                self.now_ms = t
                self.next_arrival = lo + k + 1
                for nxt in place((lo + k, t, ads[k], ps[k], os_[k]), t):
                    heappush(heap, (nxt.t_ms, next(seq), nxt))
            if progress is not None:
                progress(hi)
        while heap:
            ev_t, _, ev = pop(heap)
            self.now_ms = ev_t
            push(ev.handle(self))
        _, price, tenancy = self._bill
        self.metrics.billed_usd = inference_cost_usd(
            self._billed_ms, gpu_price_per_hour=price, tenancy_factor=tenancy
        )
        start = float(trace.t_ms[0]) if self.n else 0.0
        if self.measure_from_ms is not None:
            start = max(start, self.measure_from_ms)
        # the last arrival or completion; periodic ticks past it do not lengthen the run
        last_arrival = float(trace.t_ms[-1]) if self.n else 0.0
        self.metrics.end_ms = max([last_arrival, *(ex.busy_until_ms for ex in self.executors)])
        self.span_ms = self.metrics.end_ms - start
        # each executor's share of the span: a provisioned one serves from when it joined
        self.alive_ms = [
            max(0.0, min(self.metrics.end_ms, ex.retired_ms) - max(start, ex.joined_ms))
            for ex in self.executors
        ]
        return self.metrics

    def summary(self) -> dict[str, Any]:
        out = self.metrics.summary(self.executors, span_ms=self.span_ms, alive_ms=self.alive_ms)
        out["executors"] = {
            "initial": self.cfg.cluster.executors,
            "final": len(self.serving()),
            "started": len(self.executors) - self.cfg.cluster.executors,
            "max_serving": self.max_serving,
            "retired_ms": [ex.retired_ms for ex in self.executors if ex.retired_ms < math.inf],
            "gpu_hours": round(sum(self.alive_ms) / 3_600_000.0, 3),
            "joined_ms": [ex.joined_ms for ex in self.executors if ex.joined_ms > -math.inf],
        }
        out["prefetch"] = None if self.prefetch is None else self.prefetch.report(self.now_ms)
        if self.cfg.run.cold_breakdown:
            out["cold_breakdown"] = cold_breakdown(self.trace.t_ms, self.trace.source, self.metrics)
        return out


__all__ = [
    "DISK", "GPU", "HOST", "REMOTE", "Event", "ExecutorJoins", "IdleCheck", "RequestDone",
    "Simulator",
]  # fmt: skip
