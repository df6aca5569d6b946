"""The executor's step loop: the requests it holds and the one task that steps the engine.

Data flows left to right::

    intake ─queue─▶ queued ─admit─▶ model thread ─StepOutput─▶ running ─▶ TokenChunk / InferResult
                                                                       └─▶ usage outbox

The engine is stepped by :class:`~vajra.actors.executor_thread.ModelThread`: in a worker thread
(one thread limiter per GPU, so the Trio loop never blocks on the model), step after step while
there is work, never waiting for this loop. The loop (:meth:`StepLoop.run`) hands it what has
been queued (everything queued joins the next step together) and the rows to drop, and sends
what the steps produced. Requests join and leave the batch between steps.

Replies: a stream gets one ``TokenChunk`` per pass of the loop with everything its request
produced since the previous one. A loop that keeps up sends each step's token at once; one
that falls behind finds several steps waiting and sends their tokens in one chunk, so the
hops after it (gateway, client) carry fewer messages exactly when they would fall behind
too. Nothing is held back to wait for more: the first token leaves with the pass that finds it.

A request dropped early (:meth:`StepLoop.cancel`, :meth:`StepLoop.end_row`: cancelled,
expired, drained, orphaned) sends nothing more; the engine's final "abort" output says what it
computed, and that is billed. A stream's progress is journaled before each chunk it is sent
(:meth:`~vajra.actors.executor_usage.UsageOutbox.progress`), so a kill -9 of the executor does
not leave what it delivered unbilled. A request that holds an adapter slot gives it back to
the tiers when it is forgotten, whichever way it ends.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import trio

from vajra.actors.adapter_tiers import AdapterTiers
from vajra.actors.base import error_frames, now_ms
from vajra.actors.executor_thread import ModelThread
from vajra.actors.executor_usage import UsageOutbox
from vajra.bus.codec import DEFAULT_MAX_BODY_BYTES, encode
from vajra.bus.messages import InferResult, InferWork, TokenChunk, TokenLogprob
from vajra.bus.outbox import Outbox
from vajra.errors import InvalidRequest, TimeoutError, VajraError
from vajra.gpu.interface import Engine, GenerationRequest, StepOutput
from vajra.gpu.interface import TokenLogprob as EngineLogprob
from vajra.policies.decoding import SamplingParams


@dataclass(slots=True)
class _Queued:
    work: InferWork
    slot: int | None = None  # the adapter's slot, held (acquired) until the request ends
    params: SamplingParams | None = None  # built by the intake (None: from ``work.sampling``)


@dataclass(slots=True)
class _Running:
    work: InferWork
    admitted_ms: int
    chunks: int = 0
    slot: int | None = None
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    # Log-probabilities not sent yet (asked for: all of them, unless a chunk carried them).
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    # How much of ``text`` (parts) and ``token_ids`` the chunks sent so far carried.
    sent_parts: int = 0
    sent_tokens: int = 0
    # The stream's latest output not yet in a chunk (what its progress journals).
    latest: StepOutput | None = None
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
        self._finished: list[str] = []
        self._wake = trio.Event()
        self.model = ModelThread(engine, gpu, self._outputs_ready)
        # Streams with tokens not sent yet, sent at the end of the loop's pass.
        self._unsent: dict[str, _Running] = {}

    # --- what the rest of the executor asks -------------------------------------------------

    def queue(
        self, work: InferWork, slot: int | None = None, params: SamplingParams | None = None
    ) -> None:
        """Admit ``work`` at the next step (``slot``: its adapter's, already acquired;
        ``params``: its decoding, already built from ``work.sampling``)."""
        self._queued.append(_Queued(work, slot, params))
        self._wake.set()

    def queue_depth(self) -> int:
        """Requests not yet running: queued here, handed to the model thread and not yet
        taken by a step, or waiting inside the engine."""
        return len(self._queued) + self.model.waiting() + self.engine.num_waiting()

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
        self._unsent.pop(request_id, None)
        self.model.submit((), (request_id,))
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
        """Feed the model thread and send what it produced; runs until cancelled.

        Each pass: hand the queued requests to the next step, drop the rows past their
        deadline, take every step's outputs waiting, send the replies (one flush), then wait
        for more. An engine that does not block is stepped here, once per pass.
        """
        model = self.model
        blocking = self.engine.blocking
        async with trio.open_nursery() as nursery:
            if blocking:
                nursery.start_soon(model.run)
            while True:
                if not (self._queued or model.has_outputs() or (not blocking and model.runnable())):
                    self._wake = trio.Event()
                    await self._wake.wait()
                model.submit(self._take_admissible(), ())
                self._expire_running()
                if blocking and self._gpu.statistics().tasks_waiting:
                    model.hand_back()  # an adapter waits to be copied into its slot
                if not blocking:
                    model.step_inline()
                self._deliver(model.take_outputs())
                await self.replies.flush()
                self.usage.send()
                await trio.lowlevel.checkpoint()  # a busy pass still lets the intake run

    def _outputs_ready(self) -> None:
        """Called on the event loop when the model thread left outputs."""
        self._wake.set()

    def _deliver(self, steps: list[list[StepOutput]]) -> None:
        """Handle every output of ``steps`` (oldest first), then send each stream one chunk
        with everything they added."""
        for outputs in steps:
            for out in outputs:
                self._on_output(out)
        unsent, self._unsent = self._unsent, {}
        # What the chunks count goes to the journal before they leave (billed after a crash).
        self.usage.progress([(a.work, a.latest) for a in unsent.values() if a.latest is not None])
        for rid, act in unsent.items():
            too_large = self._send_chunk(act)
            if too_large is not None:
                self.end_row(rid, too_large)
        if steps:
            self.counters["engine_steps"] = self.model.steps
            self.counters["engine_handoffs"] = self.model.handoffs

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
                params = queued.params or work.sampling.params()
            except VajraError as exc:  # the gateway validates too; never trust a peer blindly
                self._release(queued)
                self.answer_error(work.request_id, exc)
                continue
            self.running[work.request_id] = _Running(work, now, slot=queued.slot)
            if not work.stream:
                self.model.quiet.add(work.request_id)  # its tokens can wait until it ends
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
        if out.logprobs:
            act.logprobs.extend(_wire_logprobs(out.logprobs))
        if out.prompt_logprobs is not None:
            act.prompt_logprobs = _wire_logprobs(out.prompt_logprobs)
        if work.stream and (out.text_delta or out.token_ids) and out.error is None:
            act.latest = out
            self._unsent[work.request_id] = act  # sent at the end of the pass (_deliver)
        if not out.finished:
            return
        too_large: VajraError | None = None
        if self._unsent.pop(work.request_id, None) is not None:
            too_large = self._send_chunk(act)
        error = out.error or too_large
        if error is not None:
            self.answer_error(work.request_id, error)
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
                logprobs=act.logprobs,
                prompt_logprobs=act.prompt_logprobs,
            )
            too_large = self._send(result)
            if too_large is not None:  # forgotten already: answer the error instead
                self.counters[f"error_{too_large.code.value}"] += 1
                self.replies.add(error_frames(work.request_id, too_large))
        if out.compute_ms > 0 or out.completion_tokens > 0:
            self.usage.record(work, out)

    def _send_chunk(self, act: _Running) -> VajraError | None:
        """Queue a chunk with what ``act`` produced since its last one (see :meth:`_send`)."""
        chunk = TokenChunk(
            act.work.request_id,
            act.chunks,
            "".join(act.text[act.sent_parts :]),
            act.token_ids[act.sent_tokens :],
            act.logprobs,
            act.prompt_logprobs,
        )
        act.sent_parts, act.sent_tokens = len(act.text), len(act.token_ids)
        act.logprobs, act.prompt_logprobs = [], None
        act.chunks += 1
        if len(chunk.token_ids) > 1:
            self.counters["tokens_coalesced"] += len(chunk.token_ids) - 1
        return self._send(chunk)

    def _send(self, msg: TokenChunk | InferResult) -> VajraError | None:
        """Queue ``msg`` for the gateway; or, when log-probabilities make it larger than any
        reply may be (a client decodes at most that), the error to answer instead."""
        frames = encode(msg)
        if len(frames[1]) <= DEFAULT_MAX_BODY_BYTES:
            self.replies.add(frames)
            return None
        return InvalidRequest(
            f"the log-probabilities asked for do not fit in one reply of at most "
            f"{DEFAULT_MAX_BODY_BYTES} bytes: ask for fewer, or stream the request",
            field="prompt_logprobs" if msg.prompt_logprobs else "logprobs",
        )

    def _finish(self, request_id: str) -> None:
        """Forget a request (it counts as finished) and release its adapter."""
        act = self.running.pop(request_id, None)
        self.model.quiet.discard(request_id)
        self._finished.append(request_id)
        if act is not None:
            self._release(_Queued(act.work, act.slot))
            if act.latest is not None:
                self.usage.forget(request_id)  # recorded next, if it computed anything

    def _release(self, queued: _Queued) -> None:
        if queued.slot is not None and self.tiers is not None and queued.work.adapter_digest:
            self.tiers.release(queued.work.adapter_digest)
            queued.slot = None


def _wire_logprobs(entries: tuple[EngineLogprob, ...]) -> list[TokenLogprob]:
    return [TokenLogprob(e.token_id, e.token, e.logprob, e.top) for e in entries]
