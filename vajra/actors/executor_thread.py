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

import torch
import trio

from vajra.gpu.interface import Engine, GenerationRequest, StepOutput

log = logging.getLogger("vajra.executor")

#: The longest one hand-off runs steps before it gives the GPU's limiter back.
DEFAULT_MAX_RUN_S = 0.05
#: Steps whose outputs may wait for the loop before the model thread pauses.
DEFAULT_MAX_STEPS_AHEAD = 64
#: Steps that moved only quiet requests (:attr:`ModelThread.quiet`) before the loop is woken.
DEFAULT_QUIET_STEPS = 8


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
        """Is there anything for a step to do, with room for its outputs?"""
        return bool(self._admit or self._abort or self.engine.has_work()) and (
            len(self._outputs) < self.max_steps_ahead
        )

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
        while self._step(inline=False) and time.monotonic() < until and not self._hand_back:
            pass

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
