"""The engine before the paged-KV rewrite, kept only as the engine benchmark's baseline (c).

A copy of ``vajra.gpu.engine.TorchEngine`` as it was at the commit before the rewrite (with its
``kv_batch``, ``text_stream`` and sampling functions beside it in this package), base model only:
the LoRA pool and its per-row adapter slots are dropped, nothing else changed, except
:meth:`BaselineEngine.kv_stats` added for the benchmark. ``vajra bench engine`` runs it beside
the current engine in the same process, so "before" and "after" are measured together. Do not
use it to serve.

Continuous batching over a Hugging Face causal LM. One worker thread calls
:meth:`BaselineEngine.step` over and over (never concurrently). Each step:

1. tokenizes and queues the admitted requests (a prompt that cannot run gets a finished
   output with an ``InvalidRequest`` at once);
2. drops aborted requests, queued or running (those admitted in the same step included): each
   gets one finished output with ``finish_reason="abort"`` carrying its token counts and model
   time so far; an id the engine does not hold gets none;
3. runs ONE decode forward for every running row together: rows of different lengths share
   the pass through left padding, a 2-D attention mask and per-row position ids;
4. prefills waiting requests into the free slots (up to ``max_batch_size`` rows) in one padded
   forward, samples their first token and appends them to the running batch.

So every live request gets exactly one new token per step. Nothing raises out of ``step()``.
The running rows and their KV cache are a :class:`~vajra.bench.baseline_engine.kv_batch.Batch`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from vajra.bench.baseline_engine.kv_batch import Batch, Row
from vajra.bench.baseline_engine.sampling import BAD_ROW, make_generator, sample_next_tokens
from vajra.bench.baseline_engine.text_stream import TextStream
from vajra.errors import InternalError, InvalidRequest, VajraError
from vajra.gpu.interface import AdapterResidency, GenerationRequest, StepOutput
from vajra.gpu.model import load_model

_COMPUTE_STREAMS = 4  # CUDA streams the batches rotate through

log = logging.getLogger(__name__)


class BaselineEngine:
    """Continuous batching over a Hugging Face causal LM with its KV cache (see module docstring).

    ``max_model_len`` bounds prompt plus completion tokens (and is capped by the model's
    ``max_position_embeddings``); a prompt longer than ``max_model_len - 1`` is refused.
    Prompts are encoded with the tokenizer's special tokens (Llama-style tokenizers put BOS in
    front) unless the prompt already starts with the BOS text, e.g. from a chat template; an
    empty prompt becomes the BOS token alone.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str | None = None,
        dtype: str = "auto",
        max_batch_size: int = 32,
        max_model_len: int = 2048,
    ) -> None:
        loaded = load_model(Path(model_dir), device=device, dtype=dtype)
        self.blocking = True
        self.model_name = Path(model_dir).name
        self.device = str(loaded.device)
        self.max_batch_size = max_batch_size
        self.max_model_len = min(max_model_len, loaded.max_position_embeddings)
        self.tokenizer: Any = loaded.tokenizer
        self._model: Any = loaded.model
        self._device = loaded.device
        # On CUDA each batch's forward runs on the next stream of a small pool.
        self._streams = (
            [torch.cuda.Stream(self._device) for _ in range(_COMPUTE_STREAMS)]  # type: ignore[no-untyped-call]
            if self._device.type == "cuda"
            else []
        )
        self._next_stream = 0
        self._eos = loaded.eos_token_ids
        pad = self.tokenizer.pad_token_id
        self._pad_id: int = pad if pad is not None else 0
        self._waiting: dict[str, Row] = {}  # admission order
        self._batch: Batch | None = None
        self.adapters: AdapterResidency | None = None  # base model only

    def kv_stats(self) -> dict[str, int | None]:
        """Added for the benchmark: the bytes of the padded KV cache the running batch holds
        against the tokens it really caches (``live_tokens``); no blocks, no prefix cache."""
        allocated = live = 0
        if self._batch is not None:
            for layer in self._batch.cache.layers:
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        allocated += t.numel() * t.element_size()
            live = sum(seq.num_cached for seq in self._batch.seqs)
        return {
            "allocated_bytes": allocated,
            "live_tokens": live,
            "used_blocks": None,
            "total_blocks": None,
            "prefix_hits": None,
            "prefix_queries": None,
        }

    def num_running(self) -> int:
        return 0 if self._batch is None else len(self._batch.seqs)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return self._batch is not None or bool(self._waiting)

    def step(self, admit: Sequence[GenerationRequest], abort: Sequence[str]) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        try:
            with torch.inference_mode():
                for request in admit:
                    refused = self._admit(request)
                    if refused is not None:
                        outputs.append(refused)
                for request_id in abort:
                    aborted = self._abort(request_id)
                    if aborted is not None:
                        outputs.append(aborted)
                if self._batch is not None:
                    outputs += self._decode(self._batch)
                if self._waiting and self.num_running() < self.max_batch_size:
                    outputs += self._prefill()
        except Exception as exc:  # a bug, not an input: end what is held, keep the engine usable
            log.exception("engine step failed; finishing every request it held")
            ended = {out.request_id for out in outputs if out.finished}
            held = [*self._waiting.values(), *(self._batch.seqs if self._batch else [])]
            self._waiting, self._batch = {}, None
            outputs = [o for o in outputs if o.finished] + [
                _error_output(seq, exc) for seq in held if seq.request.request_id not in ended
            ]
        return outputs

    def _forward(
        self,
        input_ids: torch.Tensor,  # [rows, new_tokens]
        attention_mask: torch.Tensor,  # [rows, cached + new_tokens]
        position_ids: torch.Tensor,  # [rows, new_tokens]
        cache: DynamicCache,
    ) -> tuple[torch.Tensor, float]:
        """The one model call: the logits at each row's last position [rows, vocab], and ms.

        On CUDA it runs on a stream from the engine's pool and ends with a device
        synchronisation (which also times it), so the next batch may use any stream.
        """
        start = time.perf_counter()
        with self._compute_stream():
            out = self._model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        logits: torch.Tensor = out.logits[:, -1, :]
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return logits, (time.perf_counter() - start) * 1000.0

    def _compute_stream(self) -> contextlib.AbstractContextManager[Any]:
        """The next stream of the pool on CUDA; nothing on the CPU."""
        if not self._streams:
            return contextlib.nullcontext()
        stream = self._streams[self._next_stream]
        self._next_stream = (self._next_stream + 1) % len(self._streams)
        return torch.cuda.stream(stream)

    def _decode(self, batch: Batch) -> list[StepOutput]:
        try:
            ones = batch.mask.new_ones((batch.mask.shape[0], 1))
            mask = torch.cat([batch.mask, ones], dim=1)
            positions = batch.mask.sum(dim=1, keepdim=True)
            logits, ms = self._forward(batch.next_ids[:, None], mask, positions, batch.cache)
        except Exception as exc:
            log.exception("decode step failed; finishing its %d rows", len(batch.seqs))
            self._batch = None
            return [_error_output(seq, exc) for seq in batch.seqs]
        batch.mask = mask
        share = ms / len(batch.seqs)
        for seq in batch.seqs:
            seq.num_cached += 1
            seq.compute_ms += share
        outputs, self._batch = self._advance(batch, logits)
        return outputs

    def _prefill(self) -> list[StepOutput]:
        free = self.max_batch_size - self.num_running()
        seqs = [self._waiting.pop(rid) for rid in list(islice(self._waiting, free))]
        try:
            width = max(len(seq.prompt_ids) for seq in seqs)
            rows = [[self._pad_id] * (width - len(s.prompt_ids)) + s.prompt_ids for s in seqs]
            flags = [[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs]
            ids = torch.tensor(rows, dtype=torch.long, device=self._device)
            mask = torch.tensor(flags, dtype=torch.long, device=self._device)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            cache = DynamicCache()
            logits, ms = self._forward(ids, mask, positions, cache)
        except Exception as exc:
            log.exception("prefill failed; finishing its %d rows", len(seqs))
            return [_error_output(seq, exc) for seq in seqs]
        total = sum(len(seq.prompt_ids) for seq in seqs)
        for seq in seqs:
            seq.num_cached = len(seq.prompt_ids)
            seq.compute_ms += ms * seq.num_cached / total
        joined = Batch(seqs, cache, mask, next_ids=ids[:, -1])  # next_ids: set by _advance
        outputs, remaining = self._advance(joined, logits)
        if remaining is not None:
            if self._batch is None:
                self._batch = remaining
            else:
                self._batch.extend(remaining)
        return outputs

    def _advance(self, batch: Batch, logits: torch.Tensor) -> tuple[list[StepOutput], Batch | None]:
        """Sample each row's next token, report it, and drop the rows that finished."""
        params = [seq.request.params for seq in batch.seqs]
        generators = [seq.generator for seq in batch.seqs]
        batch.next_ids = sample_next_tokens(logits, params, generators)
        outputs = [
            self._emit(seq, token)
            for seq, token in zip(batch.seqs, batch.next_ids.tolist(), strict=True)
        ]
        live = [i for i, out in enumerate(outputs) if not out.finished]
        if not live:
            return outputs, None
        if len(live) < len(batch.seqs):
            batch.select(live)
        return outputs, batch

    def _emit(self, seq: Row, token: int) -> StepOutput:
        if token == BAD_ROW:
            log.error("request %s: logits cannot be sampled", seq.request.request_id)
            return _ended(
                seq,
                "error",
                InternalError(
                    "the model produced logits that cannot be sampled (NaN or infinity) for "
                    "this request; its adapter's weights may be corrupt"
                ),
            )
        seq.completion_tokens += 1
        reason: str | None = None
        if token in self._eos or seq.text.push(token):  # EOS adds no text
            reason = "stop"
        elif (
            seq.completion_tokens >= seq.request.params.max_tokens
            or len(seq.prompt_ids) + seq.completion_tokens >= self.max_model_len
        ):
            reason = "length"
        if reason is not None and seq.text.flush():
            reason = "stop"
        return StepOutput(
            request_id=seq.request.request_id,
            text_delta=seq.text.release(finished=reason is not None),
            token_ids=(token,),
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=seq.completion_tokens,
            compute_ms=seq.compute_ms,
        )

    def _admit(self, request: GenerationRequest) -> StepOutput | None:
        """Queue ``request``; return a finished error output instead if it cannot run."""
        rid = request.request_id
        if rid in self._waiting or self._row_of(rid) is not None:
            return _refusal(
                rid, InvalidRequest("request_id is already running", field="request_id")
            )
        if request.adapter_slot is not None:
            message = "the baseline engine serves the base model only"
            return _refusal(rid, InvalidRequest(message, field="adapter"))
        ids = self._encode(request.prompt)
        if not ids:
            return _refusal(rid, InvalidRequest("empty prompt and no BOS token", field="prompt"))
        if len(ids) > self.max_model_len - 1:
            message = f"prompt is {len(ids)} tokens; at most {self.max_model_len - 1} fit"
            return _refusal(rid, InvalidRequest(message, field="prompt"), prompt_tokens=len(ids))
        stream = TextStream(self.tokenizer, ids, request.params.stop)
        generator = make_generator(request.params, self._device)
        self._waiting[rid] = Row(request, ids, stream, generator)
        return None

    def _encode(self, prompt: str) -> list[int]:
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        ids: list[int] = list(self.tokenizer.encode(prompt, add_special_tokens=add_special))
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]
        return ids

    def _abort(self, request_id: str) -> StepOutput | None:
        """Drop a queued or running request; its final "abort" output (None: not held)."""
        seq = self._waiting.pop(request_id, None)
        if seq is not None:
            return _ended(seq, "abort")
        row = self._row_of(request_id)
        if row is None or self._batch is None:
            return None
        seq = self._batch.seqs[row]
        live = [i for i in range(len(self._batch.seqs)) if i != row]
        if live:
            self._batch.select(live)
        else:
            self._batch = None
        return _ended(seq, "abort")

    def _row_of(self, request_id: str) -> int | None:
        if self._batch is not None:
            for i, seq in enumerate(self._batch.seqs):
                if seq.request.request_id == request_id:
                    return i
        return None


def _refusal(request_id: str, error: VajraError, *, prompt_tokens: int = 0) -> StepOutput:
    return StepOutput(
        request_id=request_id,
        text_delta="",
        token_ids=(),
        finished=True,
        finish_reason="error",
        prompt_tokens=prompt_tokens,
        completion_tokens=0,
        compute_ms=0.0,
        error=error,
    )


def _ended(seq: Row, reason: str, error: VajraError | None = None) -> StepOutput:
    """The final output of a request that ends without a new token (an abort or an error),
    with what it computed so far."""
    return StepOutput(
        request_id=seq.request.request_id,
        text_delta="",
        token_ids=(),
        finished=True,
        finish_reason=reason,
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=seq.completion_tokens,
        compute_ms=seq.compute_ms,
        error=error,
    )


def _error_output(seq: Row, exc: Exception) -> StepOutput:
    return _ended(seq, "error", InternalError(f"model step failed: {type(exc).__name__}: {exc}"))


def load_baseline_engine(
    model: str | Path,
    *,
    device: str | None = None,
    dtype: str = "auto",
    max_batch_size: int = 32,
    max_model_len: int = 2048,
) -> BaselineEngine:
    """The baseline engine on the model directory ``model`` (base model only)."""
    return BaselineEngine(
        Path(model),
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_model_len=max_model_len,
    )
