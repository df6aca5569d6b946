"""The scheduler: places each request on an executor and notices executors that die.

Data flows left to right::

    gateways ─ROUTER(frontend)─▶ scheduler ─ROUTER(dispatch)─▶ executors
    executors ─ExecutorHello / LoadReport─▶ scheduler
    scheduler ═RequestEvents═▶ predictor (PUB, one message per batch of placements)
    scheduler ═CapacityWanted═▶ supervisor (PUB: start an executor, see scheduler_placement)
    predictor ─AdapterTierCommand─▶ scheduler ─▶ the executor(s) placement names
    predictor ─AdapterForecasts─▶ scheduler ─▶ every executor
    scheduler ─ErrorReply─▶ gateway   (no executor can take it; its executor was lost)
    gateway ─CancelWork─▶ scheduler ─CancelWork─▶ the executor holding each request
    gateway ─GatewayHello─▶ scheduler ─GatewayHello─▶ every executor
    gateway|executor ─AdapterSwap─▶ scheduler ─AdapterWarm─▶ executors (see scheduler_swaps)
    gateway|executor ─JobQueued─▶ scheduler ─JobOffer─▶ an executor (see scheduler_jobs)

Placement is Algorithm 2 over what the executors report (load, adapters per tier): see
:mod:`vajra.actors.scheduler_placement`, which also holds requests no executor has room for
(bounded, then ``no_capacity``) and routes the predictor's tier commands.

The request body is forwarded to the executor byte for byte (decoded once, never re-encoded).
The scheduler remembers which requests each executor holds until a LoadReport lists them as
finished; when an executor stops reporting for ``executor_timeout_s``, or comes back with a
new incarnation, its non-streaming requests are dispatched again, once, to another executor
and every other request it held is answered with a retriable ``UnavailableError`` whose field
is ``executor`` (a gateway places a stream that has sent no token yet once more itself).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import trio

from vajra import bus
from vajra.actors.base import error_frames, now_ms, stats_frames
from vajra.actors.scheduler_jobs import JobPlacement
from vajra.actors.scheduler_placement import LivePlacement
from vajra.actors.scheduler_swaps import SwapCoordinator
from vajra.bus.codec import DecodeError, decode_many, encode
from vajra.bus.messages import (
    AdapterForecasts,
    AdapterSwap,
    AdapterTierCommand,
    AdapterWarmed,
    CancelWork,
    ExecutorHello,
    GatewayHello,
    InferWork,
    JobOffer,
    JobQueued,
    LoadReport,
    RequestEvent,
    RequestEvents,
    StatsRequest,
)
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig
from vajra.errors import EXECUTOR_LOST_FIELD, UnavailableError
from vajra.policies.placement import ExecutorLoad

log = logging.getLogger("vajra.scheduler")


@dataclass(slots=True)
class _ExecutorView:
    executor_id: str
    incarnation: str
    max_batch_size: int
    max_queue: int
    last_seen: float
    draining: bool = False
    # Queued + running as the executor last reported it: says when it is full.
    reported_load: int = 0
    # request id -> (gateway identity, deadline on the trio clock), to fail them if it dies
    inflight: dict[str, tuple[bytes, float]] = field(default_factory=dict)

    def load(self) -> ExecutorLoad:
        return ExecutorLoad(
            self.executor_id,
            len(self.inflight),
            self.max_batch_size,
            self.max_queue,
            self.draining,
            self.reported_load,
        )


class Scheduler:
    name = "scheduler"

    def __init__(self, cfg: VajraConfig) -> None:
        self.cfg = cfg
        self.counters: Counter[str] = Counter()
        self.executors: dict[str, _ExecutorView] = {}
        self._events: list[RequestEvent] = []  # placed in this batch, published after it
        self._ctx = bus.new_context()
        hwm = cfg.bus.high_water_mark
        self.frontend: ZSocket = open_socket(self._ctx, bus.ROUTER, high_water_mark=hwm)
        self.dispatch: ZSocket = open_socket(
            self._ctx, bus.ROUTER, high_water_mark=hwm, handover=True
        )
        self.events: ZSocket = open_socket(self._ctx, bus.PUB, high_water_mark=hwm)
        # What one pass produced, sent per peer at its end (see vajra.bus.outbox).
        self._to_executors = Outbox(self.dispatch)
        self._to_gateways = Outbox(self.frontend)
        # Algorithm 2 over the executors' reports; see vajra.actors.scheduler_placement.
        self.placement = LivePlacement(cfg, self.counters)
        # Training jobs: offered where placement says; see vajra.actors.scheduler_jobs.
        self.job_placement = JobPlacement(cfg, self.placement.index, self.counters)
        self.swaps = SwapCoordinator(
            self.counters, lambda: list(self.executors), self._to_executors, self._flush
        )

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        c = self.cfg.cluster
        try:
            address = self.frontend.bind(c.scheduler_address)
            self.dispatch.bind(c.scheduler_dispatch_address)
            self.events.bind(c.events_address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_gateways)
                nursery.start_soon(self._serve_executors)
                nursery.start_soon(self._watch_liveness)
                nursery.start_soon(self.swaps.run)
                task_status.started(address)
        finally:
            for s in (self.frontend, self.dispatch, self.events):
                s.close()
            self._ctx.term()

    async def _flush(self) -> None:
        """Send what one pass produced: to executors, to gateways, then the events."""
        await self._to_executors.flush()
        await self._to_gateways.flush()
        if self._events:
            loads = self.placement.tier_load_ms()
            self.events.send_nowait(encode(RequestEvents(self._events, tier_load_ms=loads)))
            self._events = []
        if (wanted := self.placement.take_capacity_wanted()) is not None:
            log.info("asking for an executor start (%d wanted)", wanted.executors)
            self.events.send_nowait(encode(wanted))

    async def drain(self) -> None:
        """Nothing to finish: requests already dispatched are answered by their executors."""

    # --- gateways ---------------------------------------------------------------------------

    async def _serve_gateways(self) -> None:
        batch_size = self.cfg.bus.recv_batch
        while True:
            for frames in await self.frontend.recv_batch(batch_size):
                self._on_gateway_frames(frames)
            await self._flush()

    def _on_gateway_frames(self, frames: list[bytes]) -> None:
        """Handle one ZeroMQ message from a gateway: one or more messages back to back."""
        gateway = frames[0]
        for env, own in decode_many(frames[1:], max_body_bytes=self.cfg.bus.max_body_bytes):
            if isinstance(env, DecodeError):
                self.counters["malformed_frames"] += 1
                self._to_gateways.add(error_frames(env.request_id, env), gateway)
                continue
            msg = env.message
            if isinstance(msg, InferWork):
                self._place(gateway, msg, own)
            elif isinstance(msg, CancelWork):
                self._route_cancels(msg)
            elif isinstance(msg, GatewayHello):
                self.counters["gateway_hellos"] += 1
                for executor_id in self.executors:
                    self._to_executors.add(own, executor_id.encode())
            elif isinstance(msg, AdapterForecasts):
                self.counters["forecasts"] += 1
                for executor_id, part in self.placement.forecasts_for(msg, self.executors):
                    self._to_executors.add(encode(part), executor_id.encode())
            elif isinstance(msg, AdapterTierCommand):
                targets = self.placement.route_tier_command(msg, now_ms())
                if not msg.executor_id and targets:
                    own = encode(msgspec.structs.replace(msg, executor_id=targets[0]))
                for executor_id in targets:
                    self._to_executors.add(own, executor_id.encode())
                self.counters["tier_commands" if targets else "tier_commands_no_executor"] += 1
            elif isinstance(msg, AdapterSwap):
                self.swaps.start(msg, self._to_gateways, gateway)
            elif isinstance(msg, JobQueued):
                self.job_placement.queued(msg, trio.current_time())
                self._offer_jobs()
            elif isinstance(msg, StatsRequest):
                self.counters["executors"] = len(self.executors)
                self._to_gateways.add(
                    stats_frames(msg.request_id, self.name, self.counters), gateway
                )
            else:
                self.counters["unexpected_kind"] += 1

    def _place(
        self,
        gateway: bytes,
        work: InferWork,
        body: Sequence[bytes],
        *,
        held: bool = False,
        new: bool = True,
    ) -> bool:
        """Dispatch ``work`` where placement says, or hold it for room (True when placed or
        answered; False when ``held`` and it should stay held)."""
        if new and not held:
            self.counters["requests"] += 1
        now = now_ms()
        choice = self.placement.choose(work, now)
        view = self.executors.get(choice) if choice is not None else None
        if view is None:
            if held:
                return False
            exc = self.placement.hold(gateway, work, body, now, work.deadline_unix_ms)
            if exc is not None:
                self.counters[f"rejected_{exc.code.value}"] += 1
                self._to_gateways.add(error_frames(work.request_id, exc), gateway)
            return True
        remaining_s = max(0.0, (work.deadline_unix_ms - now) / 1000.0)
        view.inflight[work.request_id] = (gateway, trio.current_time() + remaining_s + 5.0)
        self._to_executors.add(body, view.executor_id.encode())
        self.placement.placed(work, view.executor_id, body, now)
        self.placement.load_changed(
            view.executor_id,
            dispatched=len(view.inflight),
            max_batch_size=view.max_batch_size,
            max_queue=view.max_queue,
        )
        self._events.append(
            RequestEvent(
                request_id=work.request_id,
                tenant_id=work.tenant_id,
                adapter=work.adapter,
                executor_id=view.executor_id,
                ts_unix_ms=int(now),
                prompt_chars=len(work.prompt),
                adapter_digest=work.adapter_digest,
                adapter_object_key=work.adapter_object_key,
                adapter_bytes=work.adapter_bytes,
            )
        )
        return True

    def _retry_held(self) -> None:
        """Place the requests held for room that now fit; answer those whose wait is over."""
        if not self.placement.waiting:
            return
        now = now_ms()
        for w in self.placement.take_waiting():
            if self._place(w.gateway, w.work, w.body, held=True):
                continue
            if now >= w.until_ms:
                exc = self.placement.expired_error()
                self.counters[f"rejected_{exc.code.value}"] += 1
                self._to_gateways.add(error_frames(w.work.request_id, exc), w.gateway)
            else:
                self.placement.waiting.append(w)

    def _route_cancels(self, msg: CancelWork) -> None:
        """Send each cancelled request's id to the executor holding it (unknown ids: dropped,
        the request already finished)."""
        by_executor: dict[str, list[str]] = {}
        held = self.placement.cancel_held(msg.request_ids)
        self.counters["cancels_held"] += len(held)
        for rid in msg.request_ids:
            if rid in held:
                continue
            holder = next((v for v in self.executors.values() if rid in v.inflight), None)
            if holder is None:
                self.counters["cancels_unknown"] += 1
                continue
            by_executor.setdefault(holder.executor_id, []).append(rid)
        for executor_id, rids in by_executor.items():
            self.counters["cancels"] += len(rids)
            self._to_executors.add(encode(CancelWork(rids)), executor_id.encode())

    # --- executors --------------------------------------------------------------------------

    async def _serve_executors(self) -> None:
        batch_size = self.cfg.bus.recv_batch
        while True:
            for frames in await self.dispatch.recv_batch(batch_size):
                for env, _ in decode_many(frames[1:], max_body_bytes=self.cfg.bus.max_body_bytes):
                    if isinstance(env, DecodeError):
                        self.counters["malformed_executor_frames"] += 1
                        log.warning("dropped a malformed executor frame: %s", env)
                        continue
                    msg = env.message
                    if isinstance(msg, ExecutorHello):
                        self._on_hello(msg)
                    elif isinstance(msg, LoadReport):
                        self._on_load(msg)
                    elif isinstance(msg, AdapterWarmed):
                        self.swaps.on_warmed(msg)
                    elif isinstance(msg, AdapterSwap):
                        self.swaps.start(msg, self._to_executors, frames[0])
                    elif isinstance(msg, JobQueued):  # handed back by a draining executor
                        self.job_placement.queued(msg, trio.current_time())
                        self._offer_jobs()
                    else:
                        self.counters["unexpected_executor_kind"] += 1
            await self._flush()

    def _on_hello(self, hello: ExecutorHello) -> None:
        view = self.executors.get(hello.executor_id)
        if view is not None and view.incarnation == hello.incarnation:
            view.last_seen = trio.current_time()
            view.max_batch_size, view.max_queue = hello.max_batch_size, hello.max_queue
            self.placement.load_changed(
                view.executor_id,
                dispatched=len(view.inflight),
                max_batch_size=view.max_batch_size,
                max_queue=view.max_queue,
            )
            return
        log.info("executor %s joined (incarnation %s)", hello.executor_id, hello.incarnation)
        self.executors[hello.executor_id] = _ExecutorView(
            hello.executor_id,
            hello.incarnation,
            hello.max_batch_size,
            hello.max_queue,
            trio.current_time(),
        )
        self.placement.joined(hello.executor_id, hello.max_batch_size, hello.max_queue)
        if view is not None:
            self._redispatch(view)
            self._fail_inflight(view, "its executor restarted")
        self._retry_held()

    def _on_load(self, report: LoadReport) -> None:
        view = self.executors.get(report.executor_id)
        if view is None or view.incarnation != report.incarnation:
            # Its hello was lost (or we restarted): it will say hello again within a second.
            return
        view.last_seen = trio.current_time()
        view.draining = report.draining
        view.reported_load = report.queue_depth + report.running
        for rid in report.finished_ids:
            view.inflight.pop(rid, None)
        self.placement.finished(report.finished_ids)
        self.placement.reported(report, len(view.inflight))
        self.job_placement.reported(report)
        self._retry_held()

    async def _watch_liveness(self) -> None:
        timeout = self.cfg.scheduler.executor_timeout_s
        while True:
            await trio.sleep(min(0.1, timeout / 4))
            now = trio.current_time()
            for view in list(self.executors.values()):
                if now - view.last_seen > timeout:
                    log.warning(
                        "executor %s stopped reporting; failing its requests", view.executor_id
                    )
                    self.counters["executors_lost"] += 1
                    del self.executors[view.executor_id]
                    self.placement.removed(view.executor_id)
                    self.job_placement.removed(view.executor_id)
                    self._redispatch(view)
                    self._fail_inflight(view, "its executor stopped responding")
                    self.swaps.executor_lost(view.executor_id)
                    continue
                expired = [rid for rid, (_, dl) in view.inflight.items() if dl < now]
                for rid in expired:
                    del view.inflight[rid]
                self.placement.finished(expired)
            self._retry_held()
            self._offer_jobs()
            await self._flush()

    def _offer_jobs(self) -> None:
        """Queue the offers placement makes now for training jobs (the caller flushes)."""
        if not self.job_placement.hints:
            return
        for executor_id, job_id in self.job_placement.plan(trio.current_time(), now_ms()):
            self._to_executors.add(encode(JobOffer(job_id)), executor_id.encode())

    def _redispatch(self, lost: _ExecutorView) -> None:
        """Place again, once, the non-streaming requests a lost executor held (the caller
        flushes; the rest stay in ``lost.inflight`` for :meth:`_fail_inflight`). With no
        executor left there is nowhere to send them: they fail as lost."""
        if not self.executors:
            self.placement.finished(list(lost.inflight))
            return
        for rid in list(lost.inflight):
            kept = self.placement.take_redispatch(rid)
            if kept is None:
                continue
            gateway, _ = lost.inflight.pop(rid)
            self.counters["requests_redispatched"] += 1
            self._place(gateway, kept.work, kept.body, new=False)

    def _fail_inflight(self, view: _ExecutorView, why: str) -> None:
        """Answer every request the executor held with a retriable error (the caller flushes)."""
        for rid, (gateway, _) in view.inflight.items():
            self.counters["requests_failed_executor_lost"] += 1
            exc = UnavailableError(f"request lost because {why}; retry", field=EXECUTOR_LOST_FIELD)
            self._to_gateways.add(error_frames(rid, exc), gateway)
        view.inflight.clear()
