"""The executor: one per GPU. Holds the frozen model and runs continuous batches.

Data flows left to right::

    scheduler ─InferWork─▶ executor ─TokenChunk / InferResult / ErrorReply─▶ gateway
    executor ─ExecutorHello / LoadReport─▶ scheduler
    executor ─UsageBatch─▶ ledger ─UsageAck─▶ executor        (outbox until acknowledged)
    executor ─heartbeat─▶ Redis (TTL)

One task owns the engine: it takes what has arrived, runs one engine step in a worker thread
(one thread limiter per GPU, so the Trio loop never blocks on the model), and sends what the
step produced. Requests join and leave the batch between steps.

Ending early: a request cancelled by its caller (``CancelWork``), sent by an earlier
incarnation of its gateway (``GatewayHello``: nobody can receive its tokens any more), past its
deadline or still running at the end of a drain is dropped from the batch at the next step; the
engine's final "abort" output says what it computed, and that is billed. Every failure while
admitting a request (its adapter's load included) becomes that request's typed error.

Drain (SIGTERM): tell the scheduler to stop placing here, finish running requests within
``drain_timeout_s``, end the rest with a retriable error (billing what they computed), then
flush usage to the ledger.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vajra import bus
from vajra.actors.adapter_tiers import AdapterTiers
from vajra.actors.base import error_frames, now_ms, wait_until
from vajra.bus.codec import DecodeError, decode, decode_many, encode
from vajra.bus.messages import (
    AdapterTierCommand,
    CancelWork,
    ExecutorHello,
    GatewayHello,
    InferResult,
    InferWork,
    LoadReport,
    TokenChunk,
    UsageAck,
    UsageBatch,
    UsageEvent,
)
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig
from vajra.errors import (
    InternalError,
    InvalidRequest,
    OverloadedError,
    TimeoutError,
    UnavailableError,
    VajraError,
)
from vajra.gpu.engine import Engine, GenerationRequest, StepOutput, TorchEngine, load_engine
from vajra.gpu.sampling import SamplingParams
from vajra.state import AsyncClusterState, ExecutorHeartbeat

log = logging.getLogger("vajra.executor")


@dataclass(slots=True)
class _Queued:
    work: InferWork
    slot: int | None = None  # the adapter's pool slot, held (acquired) until the request ends


@dataclass(slots=True)
class _Active:
    work: InferWork
    admitted_ms: int
    chunks: int = 0
    slot: int | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    # The row is being dropped (cancelled, expired, drained, orphaned): it sends nothing more;
    # the engine's final "abort" output bills it and forgets it.
    ending: bool = False


class Executor:
    name = "executor"

    def __init__(
        self,
        cfg: VajraConfig,
        state: AsyncClusterState | None,
        *,
        executor_id: str,
        model: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.ecfg = cfg.executor
        self.state = state
        self.executor_id = executor_id
        self.model = model or cfg.cluster.model

        self.incarnation = uuid.uuid4().hex[:12]
        self.counters: Counter[str] = Counter()
        self.engine: Engine | None = None
        self._incoming: list[_Queued] = []
        self._adapter_waits = 0  # requests waiting for their adapter to load
        self._waiting_ids: set[str] = set()  # ... by request id
        self._cancelled_waits: set[str] = set()  # ... of those, the ones cancelled meanwhile
        self._gateways: dict[str, str] = {}  # gateway id -> its latest incarnation
        self.tiers: AdapterTiers | None = None
        self._nursery: trio.Nursery | None = None
        self._active: dict[str, _Active] = {}
        self._aborts: list[str] = []
        self._finished: list[str] = []
        self._outbox: dict[str, tuple[UsageEvent, float]] = {}
        self._usage_unsent: list[UsageEvent] = []
        self._wake = trio.Event()
        self._gpu = trio.CapacityLimiter(1)
        self._draining = False
        self._ctx = bus.new_context()
        hwm = cfg.bus.high_water_mark
        ident = executor_id.encode()
        self.work_in: ZSocket = open_socket(
            self._ctx, bus.DEALER, identity=ident, high_water_mark=hwm
        )
        self.replies: ZSocket = open_socket(
            self._ctx, bus.DEALER, identity=ident, high_water_mark=hwm
        )
        self.ledger: ZSocket = open_socket(
            self._ctx, bus.DEALER, identity=ident, high_water_mark=hwm
        )
        # Chunks, results and errors for the gateway; each loop pass flushes what it added.
        self._replies_out = Outbox(self.replies)

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        c = self.cfg.cluster
        try:
            self.engine = await trio.to_thread.run_sync(self._load_engine, limiter=self._gpu)
            log.info(
                "executor %s: model %s on %s, max batch %d",
                self.executor_id,
                self.engine.model_name,
                self.engine.device,
                self.engine.max_batch_size,
            )
            self.replies.connect(c.gateway_backend_address)
            self.ledger.connect(c.ledger_address)
            self.work_in.connect(c.scheduler_dispatch_address)
            self.tiers = self._build_tiers()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._receive_work)
                nursery.start_soon(self._engine_loop)
                nursery.start_soon(self._report_load)
                nursery.start_soon(self._receive_acks)
                nursery.start_soon(self._resend_usage)
                if self.state is not None:
                    nursery.start_soon(self._heartbeat)
                await self._hello()
                task_status.started(self.executor_id)
        finally:
            if self.tiers is not None:
                await self.tiers.aclose()
            for s in (self.work_in, self.replies, self.ledger):
                s.close()
            self._ctx.term()

    def _load_engine(self) -> Engine:
        e = self.ecfg
        device = None if e.device == "auto" else e.device
        return load_engine(
            self.model or "null",
            device=device,
            dtype=e.dtype,
            max_batch_size=e.max_batch_size,
            max_model_len=e.max_model_len,
            max_adapters=self.cfg.adapters.max_vram_adapters,
        )

    def _build_tiers(self) -> AdapterTiers | None:
        """The adapter tiers, when the engine serves adapters (a real model with a LoRA pool)."""
        engine = self.engine
        if not isinstance(engine, TorchEngine) or engine.lora_pool is None:
            return None
        from vajra.adapters.format import base_model_spec
        from vajra.storage import open_store

        return AdapterTiers(
            self.cfg,
            engine.lora_pool,
            base_model_spec(Path(self.model)),
            open_store(self.cfg),
            gpu_limiter=self._gpu,
        )

    async def drain(self) -> None:
        self._draining = True
        await self._send_load_report()
        with trio.move_on_after(self.ecfg.drain_timeout_s):
            await wait_until(lambda: not (self._active or self._incoming or self._adapter_waits))
        for queued in self._incoming:
            self._release(queued)
            self._answer_error(
                queued.work.request_id, UnavailableError("the executor is shutting down; retry")
            )
        self._incoming.clear()
        for rid in list(self._active):
            self._end_row(rid, UnavailableError("the executor is shutting down; retry"))
        await self._replies_out.flush()
        # One more engine step drops those rows and reports what they computed (billed below).
        with trio.move_on_after(self.ecfg.drain_timeout_s):
            await wait_until(lambda: not self._active)
        self._send_usage(force=True)
        with trio.move_on_after(self.cfg.ledger.flush_timeout_s):
            while self._outbox:
                await self._flush_outbox(force=True)
                await trio.sleep(0.1)
        if self._outbox:
            log.error(
                "executor %s exits with %d usage events unacknowledged",
                self.executor_id,
                len(self._outbox),
            )

    # --- work in ----------------------------------------------------------------------------

    async def _receive_work(self) -> None:
        batch_size = self.cfg.bus.recv_batch
        while True:
            for frames in await self.work_in.recv_batch(batch_size):
                for env, _ in decode_many(frames, max_body_bytes=self.cfg.bus.max_body_bytes):
                    if isinstance(env, DecodeError):
                        self.counters["malformed_frames"] += 1
                        log.warning("dropped a malformed work frame: %s", env)
                        continue
                    if isinstance(env.message, InferWork):
                        self._accept(env.message)
                    elif isinstance(env.message, CancelWork):
                        for rid in env.message.request_ids:
                            self._cancel(rid)
                    elif isinstance(env.message, GatewayHello):
                        self._on_gateway_hello(env.message)
                    elif isinstance(env.message, AdapterTierCommand):
                        assert self._nursery is not None
                        self._nursery.start_soon(self._on_tier_command, env.message)
                    else:
                        self.counters["unexpected_kind"] += 1
            await self._replies_out.flush()

    def _accept(self, work: InferWork) -> None:
        if self._orphaned(work):
            self.counters["orphaned_dropped"] += 1
            self._finished.append(work.request_id)
            return
        if self._draining:
            self._answer_error(
                work.request_id, UnavailableError("the executor is shutting down; retry")
            )
            return
        assert self.engine is not None
        if self._queue_depth() >= self.ecfg.max_queue:
            self.counters["overloaded"] += 1
            self._answer_error(
                work.request_id, OverloadedError("executor queue is full; retry later")
            )
            return
        self.counters["accepted"] += 1
        if work.adapter_digest is None:
            self._incoming.append(_Queued(work))
            self._wake.set()
        elif self.tiers is None:
            self._answer_error(
                work.request_id,
                InvalidRequest("this executor serves no adapters (no LoRA pool)", field="adapter"),
            )
        else:
            assert self._nursery is not None
            self._adapter_waits += 1
            self._waiting_ids.add(work.request_id)
            self._nursery.start_soon(self._accept_with_adapter, work)

    def _orphaned(self, work: InferWork) -> bool:
        """Sent by an earlier incarnation of its gateway: its answers can reach nobody."""
        latest = self._gateways.get(work.gateway_id)
        return latest is not None and work.gateway_incarnation != latest

    def _on_gateway_hello(self, hello: GatewayHello) -> None:
        if self._gateways.get(hello.gateway_id) == hello.incarnation:
            return
        self._gateways[hello.gateway_id] = hello.incarnation
        orphans = [q.work.request_id for q in self._incoming if self._orphaned(q.work)]
        orphans += [rid for rid, a in self._active.items() if self._orphaned(a.work)]
        for rid in orphans:
            self.counters["orphaned_cancelled"] += 1
            self._cancel(rid)
        # Requests still waiting for their adapter are checked when the load ends.

    def _cancel(self, request_id: str) -> None:
        """Drop a request, wherever it is; it sends nothing more (see the module docstring)."""
        if request_id in self._active:
            self.counters["cancelled_running"] += 1
            self._end_row(request_id, None)
            return
        for i, queued in enumerate(self._incoming):
            if queued.work.request_id == request_id:
                del self._incoming[i]
                self._release(queued)
                self._finished.append(request_id)
                self.counters["cancelled_queued"] += 1
                return
        if request_id in self._waiting_ids:
            self._cancelled_waits.add(request_id)
            return
        self.counters["cancel_unknown"] += 1

    def _end_row(self, request_id: str, error: VajraError | None) -> None:
        """Drop a running row at the next step; answer ``error`` now (None: answer nothing)."""
        act = self._active.get(request_id)
        if act is None or act.ending:
            return
        act.ending = True
        self._aborts.append(request_id)
        if error is not None:
            self.counters[f"error_{error.code.value}"] += 1
            self._replies_out.add(error_frames(request_id, error))
        self._wake.set()

    async def _on_tier_command(self, cmd: AdapterTierCommand) -> None:
        """Promote or demote an adapter; failures are counted and logged, never fatal."""
        if self.tiers is None:
            self.counters["tier_commands_ignored"] += 1
            return
        try:
            if cmd.action == "promote":
                with trio.fail_after(self.cfg.bus.rpc_timeout_s * 6):
                    await self.tiers.promote(cmd.adapter_digest, cmd.adapter_object_key, cmd.tier)
            elif cmd.action == "demote":
                self.tiers.demote(cmd.adapter_digest, cmd.tier)
            else:
                raise InvalidRequest(f"unknown tier action {cmd.action!r}", field="action")
        except (VajraError, trio.TooSlowError) as exc:
            self.counters["tier_commands_failed"] += 1
            log.warning("tier command %s %s failed: %s", cmd.action, cmd.adapter_digest[:12], exc)
            return
        except Exception:  # a bug in the tiers must not take the executor down
            self.counters["tier_commands_failed"] += 1
            log.exception("tier command %s %s failed", cmd.action, cmd.adapter_digest[:12])
            return
        self.counters[f"tier_{cmd.action}"] += 1

    async def _accept_with_adapter(self, work: InferWork) -> None:
        """Load the request's adapter through the tiers, hold its slot, then queue the request."""
        assert self.tiers is not None and work.adapter_digest is not None
        try:
            remaining_s = (work.deadline_unix_ms - now_ms()) / 1000.0
            with trio.fail_after(max(0.001, remaining_s)):
                slot = await self.tiers.acquire(work.adapter_digest, work.adapter_object_key or "")
        except trio.TooSlowError:
            failed: VajraError | None = TimeoutError("deadline passed while loading its adapter")
        except VajraError as exc:
            failed = exc
        except Exception as exc:  # never let one request's adapter take the executor down
            log.exception("loading adapter %s failed", work.adapter_digest[:12])
            failed = InternalError(f"the adapter could not be loaded: {type(exc).__name__}")
        else:
            failed = None
        finally:
            self._adapter_waits -= 1
            self._waiting_ids.discard(work.request_id)
        cancelled = work.request_id in self._cancelled_waits or self._orphaned(work)
        self._cancelled_waits.discard(work.request_id)
        if cancelled:
            if failed is None:
                self.tiers.release(work.adapter_digest)
            self._finished.append(work.request_id)
            self.counters["cancelled_loading"] += 1
            return
        if failed is not None:
            self._answer_error(work.request_id, failed)
            await self._replies_out.flush()
            return
        self._incoming.append(_Queued(work, slot))
        self._wake.set()

    # --- the engine loop --------------------------------------------------------------------

    async def _engine_loop(self) -> None:
        assert self.engine is not None
        engine = self.engine
        while True:
            if not (self._incoming or self._aborts or engine.has_work()):
                self._wake = trio.Event()
                await self._wake.wait()
            admit = self._take_admissible()
            self._expire_running()
            await self._replies_out.flush()
            aborts, self._aborts = self._aborts, []
            if engine.blocking:
                outputs = await trio.to_thread.run_sync(
                    engine.step, admit, aborts, limiter=self._gpu
                )
            else:
                outputs = engine.step(admit, aborts)
                await trio.lowlevel.checkpoint()
            for out in outputs:
                self._on_output(out)
            await self._replies_out.flush()
            self._send_usage()

    def _take_admissible(self) -> list[GenerationRequest]:
        incoming, self._incoming = self._incoming, []
        now = now_ms()
        admit: list[GenerationRequest] = []
        for queued in incoming:
            work = queued.work
            if work.deadline_unix_ms <= now:
                self.counters["expired_before_start"] += 1
                self._release(queued)
                self._answer_error(work.request_id, TimeoutError("deadline passed while queued"))
                continue
            try:
                params = SamplingParams(
                    max_tokens=work.max_tokens,
                    temperature=work.temperature,
                    top_p=work.top_p,
                    stop=tuple(work.stop),
                    seed=work.seed,
                )
            except VajraError as exc:  # the gateway validates too; never trust a peer blindly
                self._release(queued)
                self._answer_error(work.request_id, exc)
                continue
            self._active[work.request_id] = _Active(work, now, slot=queued.slot)
            admit.append(GenerationRequest(work.request_id, work.prompt, params, queued.slot))
        return admit

    def _expire_running(self) -> None:
        now = now_ms()
        for rid, act in list(self._active.items()):
            if act.work.deadline_unix_ms <= now and not act.ending:
                self.counters["expired_running"] += 1
                self._end_row(rid, TimeoutError("deadline passed during generation"))

    def _on_output(self, out: StepOutput) -> None:
        act = self._active.get(out.request_id)
        if act is None:  # already answered and forgotten
            return
        work = act.work
        if act.ending or out.finish_reason == "abort":
            # Dropped: nothing more is sent; once the engine lets go of the row, bill what it
            # computed and forget it.
            if out.finished:
                self.counters["aborted"] += 1
                self._finish(work.request_id)
                if out.compute_ms > 0 or out.completion_tokens > 0:
                    self._record_usage(work, out)
            return
        if out.token_ids:
            act.token_ids.extend(out.token_ids)
        if out.text_delta:
            act.text.append(out.text_delta)
        if work.stream and (out.text_delta or out.token_ids) and out.error is None:
            chunk = TokenChunk(work.request_id, act.chunks, out.text_delta, list(out.token_ids))
            act.chunks += 1
            self._replies_out.add(encode(chunk))
        if not out.finished:
            return
        if out.error is not None:
            self._answer_error(work.request_id, out.error)
        else:
            self._finish(work.request_id)
            self.counters["completed"] += 1
            result = InferResult(
                request_id=work.request_id,
                text="".join(act.text),
                token_ids=act.token_ids,
                finish_reason=out.finish_reason or "stop",
                prompt_tokens=out.prompt_tokens,
                completion_tokens=out.completion_tokens,
                gpu_ms=out.compute_ms,
                executor_id=self.executor_id,
                queue_ms=float(act.admitted_ms - work.received_unix_ms),
            )
            self._replies_out.add(encode(result))
        if out.compute_ms > 0 or out.completion_tokens > 0:
            self._record_usage(work, out)

    def _finish(self, request_id: str) -> None:
        """Forget a request (it counts as finished) and release its adapter."""
        act = self._active.pop(request_id, None)
        self._finished.append(request_id)
        if act is not None:
            self._release(_Queued(act.work, act.slot))

    def _release(self, queued: _Queued) -> None:
        if queued.slot is not None and self.tiers is not None and queued.work.adapter_digest:
            self.tiers.release(queued.work.adapter_digest)
            queued.slot = None

    def _queue_depth(self) -> int:
        assert self.engine is not None
        return len(self._incoming) + self._adapter_waits + self.engine.num_waiting()

    def _answer_error(self, request_id: str, exc: VajraError) -> None:
        """Queue an error answer and forget the request (it counts as finished).

        The answer leaves with the caller's next ``_replies_out.flush()``.
        """
        self._finish(request_id)
        self.counters[f"error_{exc.code.value}"] += 1
        self._replies_out.add(error_frames(request_id, exc))

    # --- usage (outbox until the ledger acknowledges) ---------------------------------------

    def _record_usage(self, work: InferWork, out: StepOutput) -> None:
        event = UsageEvent(
            event_id=f"{self.executor_id}.{self.incarnation}.{work.request_id}",
            tenant_id=work.tenant_id,
            request_id=work.request_id,
            executor_id=self.executor_id,
            gpu_ms=out.compute_ms,
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            ts_unix_ms=now_ms(),
        )
        if len(self._outbox) >= self.ecfg.max_usage_outbox:
            self.counters["usage_outbox_full"] += 1
            log.error("usage outbox full (%d events); is the ledger down?", len(self._outbox))
            return
        self._outbox[event.event_id] = (event, trio.current_time())
        self._usage_unsent.append(event)

    def _send_usage(self, *, force: bool = False) -> None:
        """Send recorded usage as one batch once enough has gathered (or when ``force``).

        Batches of up to 256 events keep the ledger's per-message costs low; the load-report
        tick forces a flush, so usage reaches the ledger within a tenth of a second. What is
        not sent (a full socket) stays in the outbox and the resend loop sends it.
        """
        if self._usage_unsent and (force or len(self._usage_unsent) >= 256):
            self.ledger.send_nowait(encode(UsageBatch(self._usage_unsent)))
            self._usage_unsent = []

    async def _receive_acks(self) -> None:
        while True:
            for frames in await self.ledger.recv_batch(self.cfg.bus.recv_batch):
                try:
                    env = decode(frames)
                except DecodeError:
                    self.counters["malformed_ledger_frames"] += 1
                    continue
                if isinstance(env.message, UsageAck):
                    for eid in env.message.event_ids:
                        self._outbox.pop(eid, None)

    async def _resend_usage(self) -> None:
        while True:
            await trio.sleep(self.ecfg.usage_resend_s)
            await self._flush_outbox(force=False)

    async def _flush_outbox(self, *, force: bool) -> None:
        now = trio.current_time()
        cutoff = now - self.ecfg.usage_resend_s
        due = [e for e, sent_at in self._outbox.values() if force or sent_at <= cutoff]
        for i in range(0, len(due), 512):
            chunk = due[i : i + 512]
            if not self.ledger.send_nowait(encode(UsageBatch(chunk))):
                return
            for event in chunk:
                self._outbox[event.event_id] = (event, now)
            self.counters["usage_resent"] += len(chunk)

    # --- liveness -----------------------------------------------------------------------------

    async def _hello(self) -> None:
        hello = ExecutorHello(
            executor_id=self.executor_id,
            incarnation=self.incarnation,
            model=self.engine.model_name if self.engine else "",
            max_batch_size=self.engine.max_batch_size if self.engine else 0,
            max_queue=self.ecfg.max_queue,
        )
        await self.work_in.send(encode(hello))

    async def _send_load_report(self) -> None:
        assert self.engine is not None
        finished, self._finished = self._finished, []
        report = LoadReport(
            executor_id=self.executor_id,
            incarnation=self.incarnation,
            queue_depth=self._queue_depth(),
            running=self.engine.num_running(),
            finished_ids=finished,
            resident_adapters=self.tiers.resident() if self.tiers else [],
            draining=self._draining,
        )
        await self.work_in.send(encode(report))

    async def _report_load(self) -> None:
        every = self.ecfg.load_report_interval_s
        hello_every = max(1, round(self.ecfg.heartbeat_interval_s / every))
        for tick in itertools.count(1):
            await trio.sleep(every)
            self._send_usage(force=True)
            await self._send_load_report()
            if tick % hello_every == 0:
                await self._hello()

    async def _heartbeat(self) -> None:
        assert self.state is not None and self.engine is not None
        while True:
            hb = ExecutorHeartbeat(
                executor_id=self.executor_id,
                incarnation=self.incarnation,
                model=self.engine.model_name,
                device=self.engine.device,
                free_memory_bytes=_free_memory_bytes(self.engine.device),
                queue_depth=self._queue_depth(),
                running=self.engine.num_running(),
                resident_adapters=tuple(self.tiers.resident()) if self.tiers else (),
                max_batch_size=self.engine.max_batch_size,
                updated_ms=now_ms(),
            )
            try:
                with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                    await self.state.write_heartbeat(hb, self.ecfg.heartbeat_ttl_s)
            except (VajraError, trio.TooSlowError) as exc:
                log.warning("heartbeat not written: %s", exc)
            await trio.sleep(self.ecfg.heartbeat_interval_s)


def _free_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
