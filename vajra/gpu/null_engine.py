"""The null engine: no model, no compute; every request finishes at once (bus benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence

from vajra.gpu.interface import AdapterResidency, GenerationRequest, StepOutput


class NullEngine:
    """No model and no compute: every admitted request finishes at once with a one-token reply.

    Used to benchmark the bus. Prompts count one token per UTF-8 byte; the reply is
    :attr:`REPLY_TEXT` (token id :attr:`REPLY_TOKEN_ID`), finished for ``"length"`` when
    ``max_tokens == 1`` and for ``"stop"`` otherwise. Aborts are no-ops: nothing is ever running.
    """

    REPLY_TEXT = "."
    REPLY_TOKEN_ID = 0

    def __init__(
        self,
        *,
        device: str | None = None,
        dtype: str = "auto",
        max_batch_size: int = 32,
        max_model_len: int = 2048,
    ) -> None:
        self.model_name = "null"
        self.device = "cpu"
        self.blocking = False  # no compute: stepping inline is cheaper than a thread hop
        self.adapters: AdapterResidency | None = None  # serves no adapters
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len

    def step(self, admit: Sequence[GenerationRequest], abort: Sequence[str]) -> list[StepOutput]:
        return [
            StepOutput(
                request_id=request.request_id,
                text_delta=self.REPLY_TEXT,
                token_ids=(self.REPLY_TOKEN_ID,),
                finished=True,
                finish_reason="length" if request.params.max_tokens == 1 else "stop",
                prompt_tokens=len(request.prompt.encode()),
                completion_tokens=1,
                compute_ms=0.0,
            )
            for request in admit
        ]

    def num_running(self) -> int:
        return 0

    def num_waiting(self) -> int:
        return 0

    def has_work(self) -> bool:
        return False
