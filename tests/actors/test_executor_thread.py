"""The executor's model thread and what the step loop sends from it, with a scripted engine.

Test rules: no sockets (the replies and usage outboxes are recorders), a fake engine whose
step sleeps like a forward in its worker thread; every test under ``trio.fail_after``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import trio

from vajra.actors.base import now_ms, wait_until
from vajra.actors.executor_steps import StepLoop
from vajra.actors.executor_thread import ModelThread, set_torch_threads
from vajra.bus.codec import decode
from vajra.bus.messages import InferResult, InferWork, Sampling, TokenChunk
from vajra.gpu.interface import GenerationRequest, StepOutput
from vajra.policies.decoding import SamplingParams

LIMIT_S = 20


class ScriptedEngine:
    """Every admitted request yields one token per step until ``max_tokens``; a step sleeps
    ``step_s`` (holding no lock, like a forward that released the GIL)."""

    model_name = "scripted"
    device = "cpu"
    max_batch_size = 64
    blocking = True
    adapters = None

    def __init__(self, step_s: float = 0.002) -> None:
        self.step_s = step_s
        self.rows: dict[str, list[int]] = {}  # id -> [max_tokens, produced]
        self.calls: list[tuple[list[str], list[str]]] = []  # (admitted, aborted) per step
        self.threads: set[int] = set()
        self.gate = threading.Event()  # cleared: steps wait (a long forward)
        self.gate.set()
        self.pause_after = 0  # clear the gate after this many steps (0: never)

    def step(self, admit: Sequence[GenerationRequest], abort: Sequence[str]) -> list[StepOutput]:
        self.gate.wait(5)
        self.threads.add(threading.get_ident())
        time.sleep(self.step_s)
        self.calls.append(([r.request_id for r in admit], list(abort)))
        for r in admit:
            self.rows[r.request_id] = [r.params.max_tokens, 0]
        outputs = []
        for rid in abort:
            if (row := self.rows.pop(rid, None)) is not None:
                outputs.append(_output(rid, row[1], finished=True, reason="abort", text=""))
        for rid, row in list(self.rows.items()):
            row[1] += 1
            done = row[1] >= row[0]
            outputs.append(_output(rid, row[1], finished=done, reason="length" if done else None))
            if done:
                del self.rows[rid]
        if len(self.calls) == self.pause_after:
            self.gate.clear()
        return outputs

    def num_running(self) -> int:
        return len(self.rows)

    def num_waiting(self) -> int:
        return 0

    def has_work(self) -> bool:
        return bool(self.rows)


def _output(
    rid: str, n: int, *, finished: bool, reason: str | None, text: str | None = None
) -> StepOutput:
    return StepOutput(
        request_id=rid,
        text_delta=f"t{n} " if text is None else text,
        token_ids=(n,) if text is None else (),
        finished=finished,
        finish_reason=reason,
        prompt_tokens=1,
        completion_tokens=n,
        compute_ms=0.1 * n,
    )


def _request(rid: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(rid, "p", SamplingParams(max_tokens=max_tokens))


class Recorder:
    """Stands in for the replies outbox (frames added, flushes) and the usage outbox."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.flushes = 0
        self.flush_s = 0.0
        self.usage: list[str] = []
        self.forgotten: list[str] = []

    def add(self, frames: Sequence[bytes], peer: bytes | None = None) -> None:
        self.messages.append(decode(frames).message)

    async def flush(self) -> None:
        self.flushes += 1
        self.messages.append(("flush",))
        await trio.sleep(self.flush_s)  # a busy loop (sending takes time) falls behind

    def record(self, work: InferWork, out: StepOutput) -> None:
        self.usage.append(work.request_id)
        self.messages.append(("record", work.request_id, out.completion_tokens))

    def progress(self, rows: list[tuple[InferWork, StepOutput]]) -> None:
        # In the same list as the replies, so a test sees what was journaled before what.
        self.messages.extend(("progress", w.request_id, o.completion_tokens) for w, o in rows)

    def forget(self, request_id: str) -> None:
        self.forgotten.append(request_id)

    def send(self, *, force: bool = False) -> None:
        pass


def _work(rid: str, max_tokens: int, *, stream: bool) -> InferWork:
    return InferWork(
        request_id=rid,
        tenant_id="t_1",
        prompt="p",
        adapter=None,
        sampling=Sampling(max_tokens=max_tokens),
        stream=stream,
        deadline_unix_ms=now_ms() + 60_000,
        gateway_id="gw",
    )


async def test_one_hand_off_runs_steps_back_to_back_and_admits_together() -> None:
    engine = ScriptedEngine()
    ready = trio.Event()
    model = ModelThread(engine, trio.CapacityLimiter(1), ready.set)  # type: ignore[arg-type]
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(model.run)
            model.submit([_request("a", 40)], ())
            await ready.wait()
            # Submitted while the thread steps: both join the same next step.
            model.submit([_request("b", 5), _request("c", 5)], ())
            await wait_until(lambda: not (engine.has_work() or model.waiting()))
            nursery.cancel_scope.cancel()
    steps = [o for batch in model.take_outputs() for o in batch]
    assert sum(1 for o in steps if o.finished) == 3
    admitted = [ids for ids, _ in engine.calls if ids]
    assert admitted == [["a"], ["b", "c"]]
    assert model.steps == len(engine.calls) == 40
    assert model.handoffs < model.steps / 4  # not a thread hop per step
    assert threading.get_ident() not in engine.threads  # never on the event loop


async def test_outputs_wait_at_most_max_steps_ahead_and_the_thread_resumes() -> None:
    engine = ScriptedEngine(step_s=0.0)
    woken = 0

    def wake() -> None:
        nonlocal woken
        woken += 1

    model = ModelThread(engine, trio.CapacityLimiter(1), wake, max_steps_ahead=4)  # type: ignore[arg-type]
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(model.run)
            model.submit([_request("a", 10)], ())
            await wait_until(lambda: model.steps >= 4)
            await trio.sleep(0.05)
            assert model.steps == 4 and len(model.take_outputs()) == 4  # paused for us

            def drained() -> bool:
                model.take_outputs()  # the loop catching up, each time
                return not engine.has_work()

            await wait_until(drained)
            nursery.cancel_scope.cancel()
    assert model.steps == 10 and woken >= 2


def _wakes(quiet: bool) -> list[int]:
    """The steps after which the loop was woken, stepping inline; the loop takes the outputs
    whenever it is woken."""
    engine = ScriptedEngine(step_s=0.0)
    wakes: list[int] = []
    model = ModelThread(engine, trio.CapacityLimiter(1), lambda: wakes.append(model.steps))  # type: ignore[arg-type]
    model.quiet_steps = 5
    if quiet:
        model.quiet.add("r")
    model.submit([_request("r", 12)], ())
    while engine.has_work() or model.waiting():
        model.step_inline()
        if wakes and wakes[-1] == model.steps:
            model.take_outputs()
    return wakes


def test_quiet_requests_wake_the_loop_only_when_they_end_or_pile_up() -> None:
    assert _wakes(quiet=True) == [5, 10, 12]  # every quiet_steps, and when it ends
    assert _wakes(quiet=False) == list(range(1, 13))  # a stream: every step


async def test_hand_back_ends_the_hand_off_after_its_step() -> None:
    engine = ScriptedEngine(step_s=0.005)
    gpu = trio.CapacityLimiter(1)
    model = ModelThread(engine, gpu, lambda: None, max_run_s=60)  # type: ignore[arg-type]
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(model.run)
            model.submit([_request("a", 200)], ())
            await trio.sleep(0.02)
            model.hand_back()
            start = trio.current_time()
            async with gpu:  # what an adapter copy does: it gets the limiter within a step
                waited = trio.current_time() - start
                steps = model.steps
                await trio.sleep(0.02)
                assert model.steps == steps  # no step while someone else holds the GPU
            nursery.cancel_scope.cancel()
    assert waited < 2  # within its step, not after the hand-off's 60 s


async def test_a_stream_gets_first_token_at_once_then_one_chunk_per_pass() -> None:
    engine = ScriptedEngine(step_s=0.001)
    rec = Recorder()
    steps = StepLoop(
        engine,  # type: ignore[arg-type]
        None,
        rec,  # type: ignore[arg-type]
        rec,  # type: ignore[arg-type]
        Counter(),
        executor_id="e",
        gpu=trio.CapacityLimiter(1),
    )
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(steps.run)
            engine.pause_after = 1  # the second step waits until the first token is out
            steps.queue(_work("s", 30, stream=True))
            steps.queue(_work("w", 30, stream=False))
            await wait_until(
                lambda: any(isinstance(m, TokenChunk) for m in rec.messages), poll_s=0.001
            )
            first = next(m for m in rec.messages if isinstance(m, TokenChunk))
            assert first.token_ids == [1]  # sent by the pass that found it, not held back
            rec.flush_s = 0.01  # now the loop falls behind: steps pile up between passes
            engine.gate.set()
            await wait_until(lambda: sum(isinstance(m, InferResult) for m in rec.messages) == 2)
            nursery.cancel_scope.cancel()
    # Every token a flush sent was journaled before it (progress while the stream runs, its
    # event at the end); only the stream has progress, dropped once the stream ends.
    journaled = sent = 0
    for m in rec.messages:
        if isinstance(m, TokenChunk):
            sent += len(m.token_ids)
        elif m == ("flush",):
            assert journaled >= sent, (journaled, sent)
        elif isinstance(m, tuple) and m[1] == "s":
            journaled = max(journaled, m[2])
        elif isinstance(m, tuple):
            assert m[0] == "record", m  # the whole answer: no progress
    assert journaled == sent == 30 and rec.forgotten == ["s"]
    assert sum(1 for m in rec.messages if isinstance(m, tuple) and m[0] == "progress") > 1
    chunks = [m for m in rec.messages if isinstance(m, TokenChunk)]
    assert all(c.request_id == "s" for c in chunks)
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [t for c in chunks for t in c.token_ids] == list(range(1, 31))  # every token, in order
    assert "".join(c.text for c in chunks) == "".join(f"t{n} " for n in range(1, 31))
    assert len(chunks) < 30  # several steps' tokens travelled together
    results = {m.request_id: m for m in rec.messages if isinstance(m, InferResult)}
    assert results["w"].token_ids == list(range(1, 31)) and results["s"].completion_tokens == 30
    last_chunk = max(i for i, m in enumerate(rec.messages) if isinstance(m, TokenChunk))
    after = rec.messages[last_chunk:]
    assert not [m for m in after if isinstance(m, tuple) and m[0] == "progress"]
    assert rec.messages.index(results["s"]) > last_chunk  # the result comes after its chunks
    assert sorted(rec.usage) == ["s", "w"]  # billed once each
    assert not steps.running and steps.model.quiet == set()


def test_torch_threads_leave_a_core_on_the_cpu_and_obey_the_config() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert set_torch_threads(3, "cpu") == 3 and torch.get_num_threads() == 3
        auto = set_torch_threads(0, "cpu")
        assert auto is not None and auto >= 1
        assert set_torch_threads(0, "cuda:0") is None  # a GPU keeps torch's default
    finally:
        torch.set_num_threads(before)
