"""The executor's model thread: engine steps back to back, off the event loop.

Data flows left to right::

    step loop ─submit(admit, abort)─▶ inbox ─▶ engine.step, engine.step, ... (worker thread)
    worker thread ─each step's outputs─▶ outbox ─one wake-up─▶ step loop (takes all of them)

The event loop never waits for a step, and the model thread never waits for the event loop:
one hand-off (``trio.to_thread.run_sync`` under the GPU's limiter) runs steps for as long as
there is work, up to ``max_run_s``; before each step the thread takes whatever the loop has
submitted meanwhile (every queued request joins that one step), and after each step it leaves
the step's outputs for the loop and wakes it once (however many steps it then finds) — at
once when a step moved a stream or ended a request, else after ``quiet_steps`` steps (a whole
answer's tokens are of no use to the loop before it ends, and every wake-up takes the GIL from
the model). So the loop's work on one step's outputs overlaps the next step's forward, and a
loop that falls behind finds several steps waiting and sends each request's tokens from all of
them together.

Bounds: a hand-off ends after ``max_run_s``, or after its current step once the loop asks for
the GPU's limiter back (:meth:`ModelThread.hand_back`: an adapter is waiting to be copied into
its slot); the thread stops while ``max_steps_ahead`` steps' outputs wait for the loop, and
resumes once the loop took them.

An engine that does not block (``engine.blocking`` False: no compute) is stepped inline by the
loop itself (:meth:`ModelThread.step_inline`): a thread hop would cost more than its step.

Training (:meth:`ModelThread.attach`): fine-tuning jobs' micro-steps run on this same thread,
between engine steps, on the same frozen model; :class:`~vajra.policies.training.InterleaveRule`
decides which runs next. With preemption (``policies.training_preemption_enabled``) every
pending inference step runs before a micro-step, except that after ``inference_ratio``
(``training.inference_ratio``) inference steps in a row one micro-step runs, so a busy
executor still trains; without it, inference steps and micro-steps alternate. A micro-step is bounded in tokens
(``max_micro_tokens``), so a request or an adapter copy waits at most one micro-step: the
hand-off ends after it like after an engine step. A micro-step that raises fails its job
alone (:attr:`Training.error`); the executor goes on. Each micro-step's report is left for
the loop and wakes it (``Training.on_report``, called on the event loop). Attaching and
detaching happen on the event loop while it holds the GPU's limiter (:meth:`exclusive`),
so no hand-off is running meanwhile.

Threads: :meth:`run`, :meth:`submit`, :meth:`take_outputs` and the rest are called on the
event loop; only the worker thread calls ``engine.step``. Inbox and outbox are lists swapped
under one lock, held for a few list operations at a time.

CPU threads (:func:`set_torch_threads`): on a CPU device torch's intra-op threads spin between
operations, so a pool as large as the machine keeps every core busy even when a second thread
gains little, and the gateway, the client and this process's own event loop then wait for a
core. On the 2-core development machine, the tiny model alone: 2 threads 13,500 tokens/s at
1.97 cores busy, 1 thread 12,100 at 1.00 core. So a CPU executor leaves one core to the rest.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
import trio

from vajra.gpu.interface import Engine, GenerationRequest, StepOutput
from vajra.policies.training import InterleaveRule

log = logging.getLogger("vajra.executor")

#: The longest one hand-off runs steps before it gives the GPU's limiter back.
DEFAULT_MAX_RUN_S = 0.05
#: Steps whose outputs may wait for the loop before the model thread pauses.
DEFAULT_MAX_STEPS_AHEAD = 64
#: Steps that moved only quiet requests (:attr:`ModelThread.quiet`) before the loop is woken.
DEFAULT_QUIET_STEPS = 8
R = TypeVar("R")


class MicroStepper(Protocol):
    """What the model thread trains: one bounded micro-step at a time."""

    @property
    def finished(self) -> bool: ...

    def micro_step(self) -> Any:
        """Run one micro-step; its report (None: nothing to report)."""
        ...


@dataclass(eq=False)
class Training:
    """One job attached to the model thread. ``reports`` and ``error`` are written by the
    worker thread under the model thread's lock; take them with :meth:`ModelThread.take_reports`."""

    job_id: str
    trainer: MicroStepper
    on_report: Callable[[], None]  # called on the event loop when reports (or an error) wait
    reports: list[Any] = field(default_factory=list)
    error: Exception | None = None
    notified: bool = False
    micro_steps: int = 0

    @property
    def ready(self) -> bool:
        return self.error is None and not self.trainer.finished


class ModelThread:
    """Steps ``engine`` in a worker thread (see the module docstring); ``on_outputs`` is called
    on the event loop when outputs are waiting (once until :meth:`take_outputs` takes them)."""

    def __init__(
        self,
        engine: Engine,
        gpu: trio.CapacityLimiter,
        on_outputs: Callable[[], None],
        *,
        max_run_s: float = DEFAULT_MAX_RUN_S,
        max_steps_ahead: int = DEFAULT_MAX_STEPS_AHEAD,
        turns: InterleaveRule | None = None,
    ) -> None:
        self.engine = engine
        self._gpu = gpu
        self._on_outputs = on_outputs
        self.max_run_s = max_run_s
        self.max_steps_ahead = max(1, max_steps_ahead)
        self._lock = threading.Lock()
        # Guarded by the lock: the inbox, the outbox and whether the loop was woken for it.
        self._admit: list[GenerationRequest] = []
        self._abort: list[str] = []
        self._outputs: list[list[StepOutput]] = []
        self._notified = False
        #: Requests whose outputs may wait until they finish (whole answers, not streams): a
        #: step that moved only these does not wake the loop, until ``quiet_steps`` did.
        self.quiet: set[str] = set()
        self.quiet_steps = DEFAULT_QUIET_STEPS
        self._token: trio.lowlevel.TrioToken | None = None
        self._hand_back = False  # the loop wants the GPU's limiter: end the hand-off
        self._work = trio.Event()  # set when the inbox gets something or the outbox is taken
        #: Engine steps run, and hand-offs to the worker thread that ran them.
        self.steps = 0
        self.handoffs = 0
        #: Jobs attached (changed only under the GPU's limiter, see :meth:`exclusive`).
        self.turns = turns or InterleaveRule()
        self._training: list[Training] = []
        self._next_job = 0  # round robin over the jobs attached
        self.micro_steps = 0

    # --- the event loop's side ---------------------------------------------------------------

    def submit(self, admit: Sequence[GenerationRequest], abort: Sequence[str]) -> None:
        """Hand requests to admit and ids to abort to the next step."""
        if not (admit or abort):
            return
        with self._lock:
            self._admit.extend(admit)
            self._abort.extend(abort)
        self._work.set()

    def waiting(self) -> int:
        """Requests submitted that no step has taken yet."""
        return len(self._admit)

    def has_outputs(self) -> bool:
        return bool(self._outputs)

    def take_outputs(self) -> list[list[StepOutput]]:
        """Every step's outputs not taken yet, oldest first (one list per step)."""
        with self._lock:
            taken, self._outputs = self._outputs, []
            self._notified = False
        if len(taken) >= self.max_steps_ahead:
            self._work.set()  # the thread paused for us
        return taken

    def runnable(self) -> bool:
        """Is there anything for a step or a micro-step to do (a step: with room for its
        outputs)?"""
        return self._inference_ready() or self._training_ready()

    def _inference_ready(self) -> bool:
        return bool(self._admit or self._abort or self.engine.has_work()) and (
            len(self._outputs) < self.max_steps_ahead
        )

    def _training_ready(self) -> bool:
        return any(t.ready for t in self._training)

    # --- training jobs (event loop) -------------------------------------------------------

    async def exclusive(self, fn: Callable[[], R]) -> R:
        """``fn()`` in a worker thread while holding the GPU's limiter: no engine step or
        micro-step runs meanwhile (the hand-off in progress ends after its current step).

        For attaching and detaching jobs and for everything that touches a trainer outside
        its micro-steps (building it, checkpoints, the final weights). On cancellation the
        call in flight finishes first (it is not abandoned); its exception propagates.
        """
        self.hand_back()
        return await trio.to_thread.run_sync(fn, limiter=self._gpu)

    async def attach(self, training: Training) -> None:
        """Start running ``training``'s micro-steps, interleaved with inference."""

        def add() -> None:
            self._training.append(training)

        await self.exclusive(add)
        self._work.set()

    async def detach(self, job_id: str) -> None:
        """Stop running the job's micro-steps; once this returns none runs any more."""

        def remove() -> None:
            self._training[:] = [t for t in self._training if t.job_id != job_id]

        await self.exclusive(remove)

    def training_jobs(self) -> list[str]:
        return [t.job_id for t in self._training]

    def take_reports(self, training: Training) -> list[Any]:
        """The job's micro-step reports not taken yet, oldest first."""
        with self._lock:
            taken, training.reports = training.reports, []
            training.notified = False
        return taken

    def hand_back(self) -> None:
        """Ask the worker thread to end its hand-off after the step it is running."""
        self._hand_back = True

    def step_inline(self) -> None:
        """One step on the calling thread (engines that do not block), if there is work."""
        if self.runnable():
            self._step(inline=True)

    async def run(self) -> None:
        """Hand the engine to the worker thread whenever it has work; runs until cancelled.

        A hand-off in progress is not abandoned on cancellation: it ends within
        ``max_run_s`` (the engine is never left mid-step).
        """
        self._token = trio.lowlevel.current_trio_token()
        while True:
            if not self.runnable():
                self._work = trio.Event()
                await self._work.wait()
                continue
            self.handoffs += 1
            await trio.to_thread.run_sync(self._run_steps, limiter=self._gpu)

    # --- the worker thread's side ------------------------------------------------------------

    def _run_steps(self) -> None:
        self._hand_back = False  # asked while this hand-off waited for the limiter: it has it now
        until = time.monotonic() + self.max_run_s
        if not self._training:
            while self._step(inline=False) and time.monotonic() < until and not self._hand_back:
                pass
            return
        while time.monotonic() < until and not self._hand_back:
            turn = self.turns.next(
                inference_pending=self._inference_ready(),
                training_pending=self._training_ready(),
            )
            if turn == "idle":
                return
            if turn == "inference":
                self._step(inline=False)
            else:
                self._micro_step()

    def _micro_step(self) -> None:
        """One micro-step of the next ready job (round robin); its report or its error is left
        for the loop, which is woken once until it takes them."""
        ready = [t for t in self._training if t.ready]
        if not ready:
            return
        self._next_job = (self._next_job + 1) % len(ready)
        job = ready[self._next_job]
        try:
            report = job.trainer.micro_step()
            error: Exception | None = None
        except Exception as exc:  # one job's failure must not end the executor's model thread
            log.exception("training job %s failed in a micro-step", job.job_id)
            report, error = None, exc
        with self._lock:
            job.micro_steps += 1
            self.micro_steps += 1
            if report is not None:
                job.reports.append(report)
            if error is not None:
                job.error = error
            notify = not job.notified and (
                report is not None or error is not None or job.trainer.finished
            )
            job.notified = job.notified or notify
        if notify:
            assert self._token is not None
            self._token.run_sync_soon(job.on_report)

    def _urgent(self, outputs: list[StepOutput], ahead: int) -> bool:
        """Must the loop see these outputs now? Yes for a stream's tokens and for any request
        that ended; a step that only moved quiet requests waits for ``quiet_steps`` more."""
        if not outputs:
            return False
        if ahead >= min(self.quiet_steps, self.max_steps_ahead):
            return True
        quiet = self.quiet
        return any(out.finished or out.request_id not in quiet for out in outputs)

    def _step(self, *, inline: bool) -> bool:
        """Take the inbox and run one step; False when there was nothing to do or the loop
        has ``max_steps_ahead`` steps to catch up on."""
        with self._lock:
            admit, self._admit = self._admit, []
            abort, self._abort = self._abort, []
        if not (admit or abort or self.engine.has_work()):
            return False
        outputs = self.engine.step(admit, abort)
        with self._lock:
            self.steps += 1
            if outputs:
                self._outputs.append(outputs)
            ahead = len(self._outputs)
            notify = not self._notified and self._urgent(outputs, ahead)
            self._notified = self._notified or notify
        if notify:
            if inline:
                self._on_outputs()
            else:
                assert self._token is not None
                self._token.run_sync_soon(self._on_outputs)
        return ahead < self.max_steps_ahead


def set_torch_threads(configured: int, device: str | None) -> int | None:
    """Size torch's intra-op thread pool for an executor (see the module docstring).

    ``configured`` > 0 is used as it is. 0: on a CPU device (``device`` "cpu", or None without
    CUDA) the cores this process may use less one, at least one, unless ``OMP_NUM_THREADS``
    says otherwise; on a GPU, torch's default is kept. Returns the size set (None: unchanged).
    Call it before the engine loads (threads that already ran torch keep their pool).
    """
    threads: int | None = configured if configured > 0 else None
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if threads is None and on_cpu and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) - 1)
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("torch uses %d CPU thread(s) for the model", threads)
    return threads
