"""The executor actor: one per GPU. Holds the frozen model and runs continuous batches.

Data flows left to right::

    scheduler ─InferWork─▶ executor ─TokenChunk / InferResult / ErrorReply─▶ gateway
    executor ─ExecutorHello / LoadReport─▶ scheduler
    executor ─UsageBatch─▶ ledger ─UsageAck─▶ executor        (outbox until acknowledged)
    executor ─heartbeat─▶ Redis (TTL)

This module wires the parts together and owns the sockets and the lifecycle; each part has
its own module:

* :mod:`vajra.actors.executor_intake` — work in: accept, refuse, cancel, adapter loads, the
  predictor's tier commands;
* :mod:`vajra.actors.executor_steps` — the requests held, and the task that feeds the engine
  and sends what it produced;
* :mod:`vajra.actors.executor_thread` — the model thread: engine steps back to back in a
  worker thread (one thread limiter per GPU, so the Trio loop never blocks), never waiting
  for the event loop between steps;
* :mod:`vajra.actors.executor_usage` — usage events until the ledger acknowledges them;
* :mod:`vajra.actors.executor_liveness` — hellos, load reports and heartbeats;
* :mod:`vajra.actors.adapter_tiers` — adapters from the object store to the engine's slots,
  when the engine serves adapters (``engine.adapters``);
* :mod:`vajra.actors.executor_jobs` — training jobs claimed from Redis, their micro-steps
  interleaved with inference on the model thread (with a cluster state and an engine that
  trains).

Ending early: a request cancelled by its caller (``CancelWork``), sent by an earlier
incarnation of its gateway (``GatewayHello``: nobody can receive its tokens any more), past its
deadline or still running at the end of a drain is dropped from the batch at the next step; the
engine's final "abort" output says what it computed, and that is billed. Every failure while
admitting a request (its adapter's load included) becomes that request's typed error.

Drain (SIGTERM): tell the scheduler to stop placing here, finish running requests within
``drain_timeout_s``, end the rest with a retriable error (billing what they computed), then
flush usage to the ledger. Training jobs are meanwhile checkpointed where they stand and
queued again, to be continued by another executor (``JobRunner.hand_back``).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from pathlib import Path

import trio

from vajra import bus
from vajra.actors.adapter_tiers import AdapterTiers
from vajra.actors.base import wait_until
from vajra.actors.executor_intake import Intake
from vajra.actors.executor_jobs import JobRunner
from vajra.actors.executor_liveness import Liveness
from vajra.actors.executor_steps import StepLoop
from vajra.actors.executor_thread import set_torch_threads
from vajra.actors.executor_usage import UsageOutbox
from vajra.bus.messages import AdapterSwap, AdapterSwapDone
from vajra.bus.outbox import Outbox
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig
from vajra.errors import UnavailableError
from vajra.gpu.interface import Engine
from vajra.gpu.loading import load_engine
from vajra.state import ClusterState, OffLoop

log = logging.getLogger("vajra.executor")
#: How long a drained executor's last messages to the scheduler may take to go out at close.
DRAINED_FLUSH_MS = 2000


class Executor:
    name = "executor"

    def __init__(
        self,
        cfg: VajraConfig,
        state: ClusterState | None,
        *,
        executor_id: str,
        model: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.ecfg = cfg.executor
        self.state = state
        self.redis = OffLoop()  # Redis calls, off the event loop
        self.executor_id = executor_id
        self.model = model or cfg.cluster.model

        self.incarnation = uuid.uuid4().hex[:12]
        self.counters: Counter[str] = Counter()
        self._gpu = trio.CapacityLimiter(1)
        self._drained = False  # drain() completed: flush the scheduler socket on close
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
        self.usage = UsageOutbox(
            cfg,
            self.ledger,
            self.counters,
            executor_id=executor_id,
            incarnation=self.incarnation,
        )
        # Set once the engine is loaded (in ``run``).
        self.engine: Engine | None = None
        self.tiers: AdapterTiers | None = None
        self.steps: StepLoop | None = None
        self.intake: Intake | None = None
        self.liveness: Liveness | None = None
        self.jobs: JobRunner | None = None

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        c = self.cfg.cluster
        try:
            engine = await trio.to_thread.run_sync(self._load_engine, limiter=self._gpu)
            self.engine = engine
            log.info(
                "executor %s: model %s on %s, max batch %d",
                self.executor_id,
                engine.model_name,
                engine.device,
                engine.max_batch_size,
            )
            self.replies.connect(c.gateway_backend_address)
            self.ledger.connect(c.ledger_address)
            self.work_in.connect(c.scheduler_dispatch_address)
            tiers = self.tiers = self._build_tiers(engine)
            steps = self.steps = StepLoop(
                engine,
                tiers,
                self._replies_out,
                self.usage,
                self.counters,
                executor_id=self.executor_id,
                gpu=self._gpu,
            )
            intake = self.intake = Intake(
                self.cfg, steps, tiers, self.counters, executor_id=self.executor_id
            )
            self.jobs = self._build_jobs(steps, intake)
            if self.jobs is not None:
                intake.job_offers = self.jobs.offer
            liveness = self.liveness = Liveness(
                self.cfg,
                self.work_in,
                engine,
                tiers,
                intake,
                self.usage,
                executor_id=self.executor_id,
                incarnation=self.incarnation,
                jobs=self.jobs,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(intake.run, self.work_in)
                nursery.start_soon(steps.run)
                nursery.start_soon(liveness.report_load)
                nursery.start_soon(self.usage.receive_acks)
                nursery.start_soon(self.usage.resend)
                if self.state is not None:
                    nursery.start_soon(liveness.heartbeat, self.state, self.redis)
                if self.jobs is not None:
                    nursery.start_soon(self.jobs.run)
                await liveness.hello()
                task_status.started(self.executor_id)
        finally:
            if self.tiers is not None:
                await self.tiers.aclose()
            for s in (self.replies, self.ledger):
                s.close()
            # After a drain, what it sent the scheduler (the jobs handed back, the last load
            # report) still goes out, for a bounded time: ZeroMQ's send only queues it.
            self.work_in.close(linger_ms=DRAINED_FLUSH_MS if self._drained else 0)
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._ctx.term)

    def _load_engine(self) -> Engine:
        e = self.ecfg
        device = None if e.device == "auto" else e.device
        set_torch_threads(e.torch_threads, device)
        return load_engine(
            self.model or "null",
            device=device,
            dtype=e.dtype,
            max_batch_size=e.max_batch_size,
            max_model_len=e.max_model_len,
            max_adapters=self.cfg.adapters.max_vram_adapters,
            max_adapter_rank=self.cfg.adapters.max_rank,
            kv_cache_bytes=e.kv_cache_bytes or None,
            kv_memory_fraction=e.kv_memory_fraction,
            kv_block_size=e.kv_block_size,
            max_batch_tokens=e.max_batch_tokens,
            decode_graphs=e.decode_graphs,  # type: ignore[arg-type]  # checked by the engine
            fused_layers=e.fused_layers,
        )

    def _build_tiers(self, engine: Engine) -> AdapterTiers | None:
        """The adapter tiers, when the engine serves adapters (it has adapter slots)."""
        if engine.adapters is None:
            return None
        from vajra.adapters.format import base_model_spec
        from vajra.storage import open_store

        return AdapterTiers(
            self.cfg,
            engine.adapters,
            base_model_spec(Path(self.model)),
            open_store(self.cfg),
            gpu_limiter=self._gpu,
        )

    def _build_jobs(self, steps: StepLoop, intake: Intake) -> JobRunner | None:
        """The training-job runner, when this executor can train (a cluster state, an engine
        with a model and a tokenizer, ``training.max_jobs_per_executor`` > 0)."""
        from vajra.actors.executor_jobs import SWAP_TIMEOUT_S, interleave_rule
        from vajra.storage import open_store

        steps.model.turns = interleave_rule(self.cfg)
        engine = steps.engine
        trains = hasattr(engine, "model") and hasattr(engine, "tokenizer")
        if self.state is None or not trains or self.cfg.training.max_jobs_per_executor <= 0:
            return None
        send = self.work_in.send

        async def swap(msg: AdapterSwap) -> AdapterSwapDone:
            return await intake.swaps.request(send, msg, SWAP_TIMEOUT_S)

        return JobRunner(
            self.cfg,
            self.state,
            open_store(self.cfg),
            steps.model,
            self.usage,
            executor_id=self.executor_id,
            swap=swap,
            to_scheduler=send,
        )

    def queue_depth(self) -> int:
        """Requests accepted and not yet running (0 before the engine is loaded)."""
        return 0 if self.intake is None else self.intake.queue_depth()

    async def drain(self) -> None:
        """Stop taking work, finish or end what is held, then flush usage (module docstring)."""
        assert self.intake is not None and self.steps is not None and self.liveness is not None
        intake, steps = self.intake, self.steps
        intake.draining = True
        await self.liveness.send_load_report()
        async with trio.open_nursery() as nursery:
            if self.jobs is not None:
                nursery.start_soon(self.jobs.hand_back)
            with trio.move_on_after(self.ecfg.drain_timeout_s):
                await wait_until(intake.is_idle)
        steps.end_all(UnavailableError("the executor is shutting down; retry"))
        await self._replies_out.flush()
        # One more engine step drops those rows and reports what they computed (billed below).
        with trio.move_on_after(self.ecfg.drain_timeout_s):
            await wait_until(lambda: not steps.running)
        await self.usage.drain()
        self._drained = True
