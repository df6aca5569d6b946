"""The model thread's loop when a training job shares the engine with inference.

:class:`Interleaver` owns the engine's inbox on that thread: requests to admit and ids to
abort are handed to it (:meth:`Interleaver.submit`, :meth:`Interleaver.abort`) and it runs,
per :meth:`Interleaver.run_once`, either one engine step (which takes everything submitted)
or one training micro-step, as :class:`~vajra.policies.training.InterleaveRule` decides.

Latency bound: at most one micro-step runs between two inference steps, and a micro-step
carries at most ``max_micro_tokens`` tokens, so a job adds at most one bounded micro-step's
time to any token's latency (with preemption on, only once per ``inference_ratio`` steps
under a steady load, and never while inference was pending with a ratio of 0).

Not thread-safe: one thread calls everything, as with ``engine.step``. An exception from a
micro-step propagates (the engine and its requests are unaffected; the model was restored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vajra.gpu.interface import Engine, GenerationRequest, StepOutput
from vajra.gpu.training.trainer import LoraTrainer, StepReport
from vajra.policies.training import DEFAULT_INFERENCE_RATIO, InterleaveRule


@dataclass(slots=True)
class Ran:
    """What one :meth:`Interleaver.run_once` did."""

    kind: str  # "inference", "train" or "idle"
    outputs: list[StepOutput] = field(default_factory=list)
    report: StepReport | None = None


class Interleaver:
    """Inference and one training job on one engine (module docstring). ``trainer`` may be
    None (no job) or be replaced between calls (:attr:`trainer`)."""

    def __init__(
        self,
        engine: Engine,
        trainer: LoraTrainer | None = None,
        *,
        preemption_enabled: bool = True,
        inference_ratio: int = DEFAULT_INFERENCE_RATIO,
    ) -> None:
        self.engine = engine
        self.trainer = trainer
        self.rule = InterleaveRule(
            preemption_enabled=preemption_enabled, inference_ratio=inference_ratio
        )
        self._admit: list[GenerationRequest] = []
        self._abort: list[str] = []

    def submit(self, requests: Sequence[GenerationRequest]) -> None:
        self._admit.extend(requests)

    def abort(self, request_ids: Sequence[str]) -> None:
        self._abort.extend(request_ids)

    @property
    def training_pending(self) -> bool:
        return self.trainer is not None and not self.trainer.finished

    @property
    def inference_pending(self) -> bool:
        return bool(self._admit or self._abort) or self.engine.has_work()

    def run_once(self) -> Ran:
        """Run the next unit of work; ``Ran("idle")`` when there is none."""
        kind = self.rule.next(
            inference_pending=self.inference_pending, training_pending=self.training_pending
        )
        if kind == "inference":
            admit, abort = self._admit, self._abort
            self._admit, self._abort = [], []
            return Ran(kind, outputs=self.engine.step(admit, abort))
        if kind == "train" and self.trainer is not None:
            return Ran(kind, report=self.trainer.micro_step())
        return Ran("idle")
