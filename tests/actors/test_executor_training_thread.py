"""Training micro-steps on the executor's model thread, interleaved with engine steps, with a
scripted engine and a scripted trainer (real objects that count, no mocks).

Test rules: no sockets; every test under ``trio.fail_after``; no timing assertions (what is
checked is the order in which the worker thread ran things).
"""

from __future__ import annotations

import threading

import trio

from tests.actors.test_executor_thread import ScriptedEngine, _request
from vajra.actors.base import wait_until
from vajra.actors.executor_thread import ModelThread, Training
from vajra.policies.training import InterleaveRule

LIMIT_S = 20


class ScriptedTrainer:
    """``total`` micro-steps, every ``per_step`` of them an optimizer step (a report);
    records into ``log`` ("T" when inference had work at that moment, "t" when not)."""

    def __init__(
        self, engine: ScriptedEngine, log: list[str], *, total: int, per_step: int = 2
    ) -> None:
        self.engine = engine
        self.log = log
        self.total = total
        self.per_step = per_step
        self.done = 0
        self.fail_at = 0  # raise in this micro-step (1-based; 0: never)
        self.threads: set[int] = set()

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def micro_step(self) -> int | None:
        self.threads.add(threading.get_ident())
        if self.done + 1 == self.fail_at:
            raise RuntimeError("out of memory in the backward")
        self.log.append("T" if self.engine.has_work() else "t")
        self.done += 1
        return self.done // self.per_step if self.done % self.per_step == 0 else None


class LoggingEngine(ScriptedEngine):
    def __init__(self, log: list[str]) -> None:
        super().__init__(step_s=0.0005)
        self.log = log

    def step(self, admit, abort):  # type: ignore[no-untyped-def]
        self.log.append("I")
        return super().step(admit, abort)


def _drain(model: ModelThread) -> None:
    """What the step loop does with the outputs (here: drops them)."""
    model.take_outputs()


def _streaks(log: list[str]) -> list[int]:
    """Inference steps between consecutive micro-steps that ran while inference had work."""
    out, run = [], 0
    for kind in log:
        if kind == "I":
            run += 1
        elif kind == "T":
            out.append(run)
            run = 0
        else:
            run = 0
    return out


async def _run(rule: InterleaveRule, *, fail_at: int = 0) -> tuple[list[str], Training, int]:
    log: list[str] = []
    engine = LoggingEngine(log)
    # No bound on outputs waiting for the loop: a loop late to drain them must not change the
    # interleaving under test.
    model = ModelThread(  # type: ignore[arg-type]
        engine, trio.CapacityLimiter(1), lambda: _drain(model), turns=rule, max_steps_ahead=10**6
    )
    trainer = ScriptedTrainer(engine, log, total=40)
    trainer.fail_at = fail_at
    woken = trio.Event()
    training = Training("job-1", trainer, woken.set)
    reports = []
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(model.run)
            model.submit([_request("a", 200), _request("b", 150)], ())
            await model.attach(training)
            while not (trainer.finished or training.error):
                await woken.wait()
                woken = trio.Event()
                training.on_report = woken.set
                reports += model.take_reports(training)
            await wait_until(lambda: not engine.has_work())
            await model.detach("job-1")
            micro_steps = training.micro_steps
            nursery.cancel_scope.cancel()
    reports += model.take_reports(training)
    assert model.training_jobs() == []
    assert trainer.threads and threading.get_ident() not in trainer.threads
    if not fail_at:
        assert reports == list(range(1, 21))  # every optimizer step reported once, in order
    return log, training, micro_steps


async def test_with_preemption_inference_runs_ratio_steps_before_each_micro_step() -> None:
    log, training, _ = await _run(InterleaveRule(preemption_enabled=True, inference_ratio=3))
    assert training.error is None
    streaks = _streaks(log)
    assert streaks and all(s >= 3 for s in streaks), log
    # Never two micro-steps in a row while inference had work.
    assert "TT" not in "".join(log)
    assert log.count("T") + log.count("t") == 40


async def test_without_preemption_the_two_alternate() -> None:
    log, training, _ = await _run(InterleaveRule(preemption_enabled=False))
    assert training.error is None
    streaks = _streaks(log)
    assert streaks and all(s == 1 for s in streaks[1:]), log


async def test_a_failing_micro_step_fails_its_job_alone() -> None:
    log, training, micro_steps = await _run(InterleaveRule(), fail_at=5)
    assert isinstance(training.error, RuntimeError)
    assert micro_steps == 5  # the failed one counted; none ran after it
    assert log.count("T") + log.count("t") == 4
    # The engine went on and finished both requests (200 and 150 tokens: 200 steps at least).
    assert log.count("I") >= 200


async def test_exclusive_waits_for_at_most_the_current_micro_step() -> None:
    log: list[str] = []
    engine = LoggingEngine(log)
    model = ModelThread(engine, trio.CapacityLimiter(1), lambda: _drain(model))  # type: ignore[arg-type]
    trainer = ScriptedTrainer(engine, log, total=10**9)
    training = Training("job-1", trainer, lambda: None)
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(model.run)
            await model.attach(training)
            await wait_until(lambda: trainer.done > 10)
            for _ in range(5):  # the training never ends, and still the loop gets the GPU
                before = trainer.done
                seen = await model.exclusive(lambda: trainer.done)
                assert seen >= before
                assert trainer.done == seen  # nothing ran while we held it
            await model.detach("job-1")
            stopped = trainer.done
            await trio.sleep(0.05)
            assert trainer.done == stopped
            nursery.cancel_scope.cancel()
