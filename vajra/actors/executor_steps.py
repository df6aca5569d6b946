"""The executor's step loop: the requests it holds and the one task that steps the engine.

Data flows left to right::

    intake ─queue─▶ queued ─admit─▶ engine.step ─StepOutput─▶ running ─▶ TokenChunk / InferResult
                                                                      └─▶ usage outbox

One task owns the engine (:meth:`StepLoop.run`): it takes what has been queued, runs one
engine step in a worker thread (one thread limiter per GPU, so the Trio loop never blocks on
the model), and sends what the step produced. Requests join and leave the batch between steps.

A request dropped early (:meth:`StepLoop.cancel`, :meth:`StepLoop.end_row`: cancelled,
expired, drained, orphaned) sends nothing more; the engine's final "abort" output says what it
computed, and that is billed. A request that holds an adapter slot gives it back to the tiers
when it is forgotten, whichever way it ends.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import trio

from vajra.actors.adapter_tiers import AdapterTiers
from vajra.actors.base import error_frames, now_ms
from vajra.actors.executor_usage import UsageOutbox
from vajra.bus.codec import encode
from vajra.bus.messages import InferResult, InferWork, TokenChunk
from vajra.bus.outbox import Outbox
from vajra.errors import TimeoutError, VajraError
from vajra.gpu.interface import Engine, GenerationRequest, StepOutput
from vajra.gpu.sampling import SamplingParams


@dataclass(slots=True)
class _Queued:
    work: InferWork
    slot: int | None = None  # the adapter's slot, held (acquired) until the request ends


@dataclass(slots=True)
class _Running:
    work: InferWork
    admitted_ms: int
    chunks: int = 0
    slot: int | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    # The row is being dropped (cancelled, expired, drained, orphaned): it sends nothing more;
    # the engine's final "abort" output bills it and forgets it.
    ending: bool = False


class StepLoop:
    """The requests an executor holds, queued and running, and the loop that steps the engine.

    ``replies`` collects what goes to the gateway; every method that adds to it says whether
    it also flushes (the loop flushes once per pass).
    """

    def __init__(
        self,
        engine: Engine,
        tiers: AdapterTiers | None,
        replies: Outbox,
        usage: UsageOutbox,
        counters: Counter[str],
        *,
        executor_id: str,
        gpu: trio.CapacityLimiter,
    ) -> None:
        self.engine = engine
        self.tiers = tiers
        self.replies = replies
        self.usage = usage
        self.counters = counters
        self.executor_id = executor_id
        self._gpu = gpu
        self._queued: list[_Queued] = []
        self.running: dict[str, _Running] = {}
        self._aborts: list[str] = []
        self._finished: list[str] = []
        self._wake = trio.Event()

    # --- what the rest of the executor asks -------------------------------------------------

    def queue(self, work: InferWork, slot: int | None = None) -> None:
        """Admit ``work`` at the next step (``slot``: its adapter's, already acquired)."""
        self._queued.append(_Queued(work, slot))
        self._wake.set()

    def queue_depth(self) -> int:
        """Requests not yet running: queued here or waiting inside the engine."""
        return len(self._queued) + self.engine.num_waiting()

    def works(self) -> list[InferWork]:
        """Every request held, queued or running."""
        return [q.work for q in self._queued] + [r.work for r in self.running.values()]

    def is_empty(self) -> bool:
        return not (self._queued or self.running)

    def take_finished(self) -> list[str]:
        """Ids of the requests forgotten since the last call (for the scheduler)."""
        finished, self._finished = self._finished, []
        return finished

    def mark_finished(self, request_id: str) -> None:
        """Count a request that never reached this table as finished."""
        self._finished.append(request_id)

    def cancel(self, request_id: str) -> bool:
        """Drop a queued or running request; it sends nothing more. False: not held here."""
        if request_id in self.running:
            self.counters["cancelled_running"] += 1
            self.end_row(request_id, None)
            return True
        for i, queued in enumerate(self._queued):
            if queued.work.request_id == request_id:
                del self._queued[i]
                self._release(queued)
                self._finished.append(request_id)
                self.counters["cancelled_queued"] += 1
                return True
        return False

    def end_row(self, request_id: str, error: VajraError | None) -> None:
        """Drop a running row at the next step; answer ``error`` now (None: answer nothing)."""
        act = self.running.get(request_id)
        if act is None or act.ending:
            return
        act.ending = True
        self._aborts.append(request_id)
        if error is not None:
            self.counters[f"error_{error.code.value}"] += 1
            self.replies.add(error_frames(request_id, error))
        self._wake.set()

    def end_all(self, error: VajraError) -> None:
        """Answer every queued request with ``error`` and end every running row with it."""
        queued, self._queued = self._queued, []
        for q in queued:
            self._release(q)
            self.answer_error(q.work.request_id, error)
        for rid in list(self.running):
            self.end_row(rid, error)

    def answer_error(self, request_id: str, exc: VajraError) -> None:
        """Queue an error answer and forget the request (it counts as finished).

        The answer leaves with the next ``replies.flush()``.
        """
        self._finish(request_id)
        self.counters[f"error_{exc.code.value}"] += 1
        self.replies.add(error_frames(request_id, exc))

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Step the engine whenever there is work; runs until cancelled."""
        engine = self.engine
        while True:
            if not (self._queued or self._aborts or engine.has_work()):
                self._wake = trio.Event()
                await self._wake.wait()
            admit = self._take_admissible()
            self._expire_running()
            await self.replies.flush()
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
            await self.replies.flush()
            self.usage.send()

    def _take_admissible(self) -> list[GenerationRequest]:
        incoming, self._queued = self._queued, []
        now = now_ms()
        admit: list[GenerationRequest] = []
        for queued in incoming:
            work = queued.work
            if work.deadline_unix_ms <= now:
                self.counters["expired_before_start"] += 1
                self._release(queued)
                self.answer_error(work.request_id, TimeoutError("deadline passed while queued"))
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
                self.answer_error(work.request_id, exc)
                continue
            self.running[work.request_id] = _Running(work, now, slot=queued.slot)
            admit.append(GenerationRequest(work.request_id, work.prompt, params, queued.slot))
        return admit

    def _expire_running(self) -> None:
        now = now_ms()
        for rid, act in list(self.running.items()):
            if act.work.deadline_unix_ms <= now and not act.ending:
                self.counters["expired_running"] += 1
                self.end_row(rid, TimeoutError("deadline passed during generation"))

    def _on_output(self, out: StepOutput) -> None:
        act = self.running.get(out.request_id)
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
                    self.usage.record(work, out)
            return
        if out.token_ids:
            act.token_ids.extend(out.token_ids)
        if out.text_delta:
            act.text.append(out.text_delta)
        if work.stream and (out.text_delta or out.token_ids) and out.error is None:
            chunk = TokenChunk(work.request_id, act.chunks, out.text_delta, list(out.token_ids))
            act.chunks += 1
            self.replies.add(encode(chunk))
        if not out.finished:
            return
        if out.error is not None:
            self.answer_error(work.request_id, out.error)
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
            self.replies.add(encode(result))
        if out.compute_ms > 0 or out.completion_tokens > 0:
            self.usage.record(work, out)

    def _finish(self, request_id: str) -> None:
        """Forget a request (it counts as finished) and release its adapter."""
        act = self.running.pop(request_id, None)
        self._finished.append(request_id)
        if act is not None:
            self._release(_Queued(act.work, act.slot))

    def _release(self, queued: _Queued) -> None:
        if queued.slot is not None and self.tiers is not None and queued.work.adapter_digest:
            self.tiers.release(queued.work.adapter_digest)
            queued.slot = None
