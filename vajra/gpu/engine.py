"""The torch engine: continuous batching over a paged KV cache with packed, chunked steps.

It implements :class:`~vajra.gpu.interface.Engine`; its LoRA pool is its
:class:`~vajra.gpu.interface.AdapterResidency` (``engine.adapters``).

One worker thread calls :meth:`TorchEngine.step` over and over (never concurrently). Each step:

1. tokenizes and queues the admitted requests (one that cannot run gets a finished output
   with an ``InvalidRequest`` at once: a prompt too long, an unknown adapter slot, a grammar
   the structured-output library refuses);
2. drops aborted requests, queued or running: each gets one finished output with
   ``finish_reason="abort"`` carrying its token counts and model time so far;
3. plans the step (:mod:`vajra.gpu.step_planner`): one decode token per running request,
   then prefill chunks of new requests under the ``max_batch_tokens`` budget; KV-aware
   admission, prefix reuse, preemption of the newest request when blocks run short;
4. runs ONE forward over the packed tokens (no padding; on CUDA on a stream that outranks
   training's, :mod:`vajra.gpu.streams`): transformers' model, attention switched to
   :mod:`vajra.gpu.paged_attention` (which writes only the step's positions into the
   block-paged cache) and its LoRA layers told each token's adapter; a step of decode tokens
   only replays a CUDA graph of that forward on CUDA (:mod:`vajra.gpu.decode_graphs`);
5. samples every request whose chunk reached its last token (:mod:`vajra.gpu.sampling`,
   vectorised; the one device synchronisation of the step is reading those tokens), and
   emits text (:mod:`vajra.gpu.text_stream`, incremental).

Nothing raises out of ``step()``: a failed forward finishes the requests it carried with
``finish_reason="error"`` (their blocks released); a request whose logits cannot be sampled
ends alone the same way.

Model time is attributed to the requests of a step in proportion to the tokens each had in
it. KV memory is allocated once: ``kv_cache_bytes``, or on CUDA ``kv_memory_fraction`` of the
device memory free after the model loaded, or on the CPU enough for ``max_batch_size``
requests of ``max_model_len`` tokens (at most 1 GiB).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

import torch

from vajra.errors import InternalError, InvalidRequest, VajraError
from vajra.gpu import fused_layers as fused
from vajra.gpu.decode_graphs import GraphMode, start_decode_graphs
from vajra.gpu.interface import AdapterResidency, GenerationRequest, StepOutput
from vajra.gpu.kv_blocks import BlockManager
from vajra.gpu.lora import LoraBatchState, LoraPool, inject_lora
from vajra.gpu.model import load_model
from vajra.gpu.paged_attention import (
    KvCache,
    KvShape,
    kv_blocks_for_budget,
    running_step,
    use_paged_attention,
)
from vajra.gpu.sampling import BAD_ROW, Sampler, SamplingParams
from vajra.gpu.step_buffers import PackedStep, StepBuffers
from vajra.gpu.step_outputs import ended, error_output, refusal
from vajra.gpu.step_planner import Sequence, StepPlan, StepPlanner, is_decode
from vajra.gpu.streams import INFERENCE_PRIORITY, fork_join, priority_stream
from vajra.gpu.text_stream import TextStream

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_BATCH_TOKENS = 2048

log = logging.getLogger(__name__)


class TorchEngine:
    """Continuous batching over a Hugging Face causal LM (see the module docstring).

    ``max_model_len`` bounds prompt plus completion tokens (capped by the model's
    ``max_position_embeddings``); a longer prompt is refused. Prompts are encoded with the
    tokenizer's special tokens (BOS in front for Llama-style tokenizers) unless the prompt
    already starts with the BOS text, e.g. from a chat template; an empty prompt becomes the
    BOS token alone. ``decode_graphs``: see :mod:`vajra.gpu.decode_graphs` ("auto": captured
    on CUDA when its kernels allow; "eager": the static path uncaptured; "off").
    ``fused_layers``: see :mod:`vajra.gpu.fused_layers` (on CUDA with triton).
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str | None = None,
        dtype: str = "auto",
        max_batch_size: int = 32,
        max_model_len: int = 2048,
        lora_pool: LoraPool | None = None,
        max_adapters: int = 0,
        max_adapter_rank: int = 64,
        kv_cache_bytes: int | None = None,
        kv_memory_fraction: float = 0.9,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        decode_graphs: GraphMode = "auto",
        fused_layers: bool = True,
    ) -> None:
        if decode_graphs not in ("auto", "eager", "off"):
            raise ValueError(f"decode_graphs must be auto, eager or off, not {decode_graphs!r}")
        loaded = load_model(Path(model_dir), device=device, dtype=dtype)
        self.blocking = True
        self.model_name = Path(model_dir).name
        self.device = str(loaded.device)
        self.max_batch_size = max_batch_size
        self.max_model_len = min(max_model_len, loaded.max_position_embeddings)
        self.tokenizer: Any = loaded.tokenizer
        self.model = self._model = loaded.model  # Any; also the trainer's (vajra.gpu.training)
        self._device = loaded.device
        self._eos = loaded.eos_token_ids
        self._stream = priority_stream(loaded.device, INFERENCE_PRIORITY)  # vajra.gpu.streams
        use_paged_attention(self._model)
        shape = KvShape.of_model(self._model)
        # fused decoder layers on CUDA: fewer, larger kernels (vajra.gpu.fused_layers)
        self.fused_layers, self.fused_layers_error = 0, None
        if fused_layers and fused.available(self._device):
            hidden = int(self._model.config.hidden_size)
            self.fused_layers_error = fused.check(self._device, shape.dtype, hidden, shape.head_dim)
            if self.fused_layers_error is None:
                self.fused_layers = fused.install(self._model, self.max_model_len)
        num_blocks = kv_blocks_for_budget(
            shape,
            loaded.device,
            block_size,
            kv_cache_bytes,
            kv_memory_fraction,
            max_batch_size * (self.max_model_len + block_size),
        )
        if num_blocks < -(-self.max_model_len // block_size) + 1:
            raise ValueError(
                f"the KV cache ({num_blocks} blocks of {block_size}) cannot hold one request "
                f"of max_model_len={self.max_model_len}; raise kv_cache_bytes"
            )
        # The budget's blocks, and one more: the decode graphs' scratch, never a request's.
        self.kv = KvCache(shape, num_blocks + 1, block_size, loaded.device)
        self._planner = StepPlanner(
            BlockManager(num_blocks, block_size),
            max_rows=max_batch_size,
            max_batch_tokens=max(max_batch_tokens, max_batch_size),
        )
        self._buffers = StepBuffers(
            loaded.device,
            max_tokens=self._planner.max_batch_tokens,
            max_rows=max_batch_size,
            max_blocks=-(-self.max_model_len // block_size) + 1,
        )
        self._sampler = Sampler(
            vocab_size=int(self._model.config.vocab_size),
            device=loaded.device,
            eos_token_ids=sorted(self._eos),
            tokenizer=self.tokenizer,
            max_rows=max_batch_size,
        )

        if lora_pool is None and max_adapters > 0:
            lora_pool = LoraPool.for_model(
                self._model, max_vram_adapters=max_adapters, max_rank=max_adapter_rank
            )
        self._lora_pool = lora_pool
        self.adapters: AdapterResidency | None = lora_pool
        self.lora_state: LoraBatchState | None = None
        if lora_pool is not None:
            self.lora_state = LoraBatchState(lora_pool, max_tokens=self._planner.max_batch_tokens)
            inject_lora(self._model, self.lora_state)
        # decode_graphs_error: why "auto" could not capture, if it failed
        self.decode_graphs, self.decode_graphs_error = start_decode_graphs(
            decode_graphs,
            self._model,
            self.kv,
            scratch_block=num_blocks,
            lora=self.lora_state,
            max_rows=max_batch_size,
            max_blocks=-(-self.max_model_len // block_size) + 1,
            stream=self._stream,
        )

    # ------------------------------------------------------------------ Engine protocol

    def num_running(self) -> int:
        return len(self._planner.running)

    def num_waiting(self) -> int:
        return len(self._planner.waiting)

    def has_work(self) -> bool:
        return bool(self._planner.running or self._planner.waiting)

    def kv_stats(self) -> dict[str, float]:
        """KV memory and prefix-cache figures (for benchmarks and metrics)."""
        live = sum(s.num_computed for s in self._planner.running)
        return {
            "allocated_bytes": self.kv.nbytes,
            "live_tokens": live,
            **self._planner.blocks.report(),
        }

    def packed_logits(
        self, prompts: Seq[Seq[int]], slots: Seq[int | None] | None = None
    ) -> list[torch.Tensor]:
        """Every position's logits of each token list, from ONE packed forward of them all
        (each with its adapter slot, or the base model): what a step computes, for scoring
        and tests. Uses free KV blocks for the duration of the call; raises ``ValueError``
        when they do not fit, or when called between steps of requests still running."""
        slots = list(slots) if slots is not None else [None] * len(prompts)
        planner = self._planner
        seqs = [
            Sequence(
                request=GenerationRequest(f"score-{i}", "", SamplingParams(), slot),
                prompt_len=len(ids),
                tokens=list(ids),
                namespace="",
                sampler=None,
                text=None,
                want_prompt_logprobs=True,
            )
            for i, (ids, slot) in enumerate(zip(prompts, slots, strict=True))
        ]
        held: list[int] = []
        try:
            for seq in seqs:
                blocks = planner.blocks.allocate(planner.blocks.blocks_for(len(seq.tokens)))
                if blocks is None:
                    raise ValueError("the prompts do not fit in the free KV blocks")
                seq.blocks = blocks
                held += blocks
            step = self._buffers.fill([(s, len(s.tokens)) for s in seqs], self.kv.block_size)
            with torch.inference_mode():
                logits = self._forward(step)
        finally:
            planner.blocks.release(held)
        return [logits[first : first + n].clone() for first, n, _ in step.prompt_rows.values()]

    def step(self, admit: Seq[GenerationRequest], abort: Seq[str]) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        try:
            with torch.inference_mode(), fork_join(self._stream):
                for request in admit:
                    refused = self._admit(request)
                    if refused is not None:
                        outputs.append(refused)
                for request_id in abort:
                    seq = self._planner.find(request_id)
                    if seq is not None:
                        self._planner.remove(seq)
                        outputs.append(ended(seq, "abort"))
                plan = self._planner.plan()
                if plan.chunks:
                    outputs += self._run(plan)
        except Exception as exc:  # a bug, not an input: end what is held, keep the engine usable
            log.exception("engine step failed; finishing every request it held")
            done = {out.request_id for out in outputs if out.finished}
            held = [*self._planner.running, *self._planner.waiting]
            for seq in held:
                self._planner.remove(seq)
            outputs = [o for o in outputs if o.finished] + [
                error_output(seq, exc) for seq in held if seq.request_id not in done
            ]
        return outputs

    # ------------------------------------------------------------------ one forward

    def _run(self, plan: StepPlan) -> list[StepOutput]:
        # Decode tokens first, shortest context first (they attend in groups of like length).
        chunks = sorted(
            plan.chunks, key=lambda c: (0, c[0].num_computed) if is_decode(*c) else (1, 0)
        )
        start = time.perf_counter()
        try:
            rows, sampled, prompt_logits, total = self._logits(chunks)
            result = self._sampler.sample(rows.float(), [seq.sampler for seq, _ in sampled])
            host = result.to_host()  # the step's one synchronisation
        except Exception as exc:
            log.exception("model step failed; finishing its %d requests", len(chunks))
            for seq, _ in chunks:
                self._planner.remove(seq)
            return [error_output(seq, exc) for seq, _ in chunks]
        ms = (time.perf_counter() - start) * 1000.0
        for seq, n in chunks:
            seq.compute_ms += ms * n / total
            self._planner.computed(seq, n)
        for seq, logits, pos in prompt_logits:
            self._collect_prompt_logprobs(seq, logits, pos)
        return [
            self._emit(seq, token, lp)
            for (seq, _), token, lp in zip(sampled, host.tokens, host.logprobs, strict=True)
        ]

    def _logits(
        self, chunks: list[tuple[Sequence, int]]
    ) -> tuple[torch.Tensor, list[tuple[Sequence, int]], list[tuple[Sequence, Any, int]], int]:
        """The step's forward: logits to sample (a row per sampled chunk), the sampled chunks,
        prompt-logprob chunks' logits and first positions, and the forward's token count."""
        if self.decode_graphs is not None and self.decode_graphs.fits(chunks):
            return self.decode_graphs.run(chunks), chunks, [], len(chunks)
        step = self._buffers.fill(chunks, self.kv.block_size)
        logits = self._forward(step)
        rows = logits.index_select(0, step.sample_rows) if step.sampled else logits[:0]
        prompt = [(s, logits[at : at + n], pos) for s, (at, n, pos) in step.prompt_rows.items()]
        return rows, step.sampled, prompt, step.layout.num_tokens

    def _forward(self, step: PackedStep) -> torch.Tensor:
        """The one model call of a step: logits at the kept positions, [kept, vocab]."""
        if self.lora_state is not None:
            self.lora_state.set_segments(step.adapter_segments, step.layout.num_tokens)
        try:
            with running_step(self.kv, step.layout):
                out = self._model(
                    input_ids=step.input_ids,
                    position_ids=step.position_ids,
                    use_cache=False,
                    logits_to_keep=step.keep,
                )
        finally:
            if self.lora_state is not None:
                self.lora_state.clear()
        logits: torch.Tensor = out.logits[0]
        return logits

    def _collect_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, pos: int) -> None:
        """Prompt logprobs from one chunk's logits (rows predict positions ``pos + 1 ..``),
        collected on the first pass over the prompt only: a recomputation after a preemption
        starts again at 0 and is skipped until it reaches what is still missing."""
        have = len(seq.prompt_logprobs)
        if (pos > 0 or have) and pos != have - 1:
            return
        end = min(pos + logits.shape[0] + 1, seq.prompt_len)
        ids = seq.tokens[pos:end]
        k = seq.request.params.prompt_logprobs or 0
        entries = self._sampler.prompt_logprobs(logits[: len(ids) - 1].float(), ids, k)
        seq.prompt_logprobs.extend(entries if pos == 0 else entries[1:])
        if len(seq.prompt_logprobs) >= seq.prompt_len:
            seq.want_prompt_logprobs = False

    def _emit(self, seq: Sequence, token: int, logprob: Any) -> StepOutput:
        if token == BAD_ROW:
            log.error("request %s: logits cannot be sampled", seq.request_id)
            self._planner.remove(seq)
            why = seq.sampler.error or (
                "the model produced logits that cannot be sampled (NaN or infinity) for this "
                "request; its adapter's weights may be corrupt"
            )
            return ended(seq, "error", InternalError(why))
        params = seq.request.params
        seq.tokens.append(token)
        seq.completion_tokens += 1
        grammar_done = seq.sampler.accept(token)
        ends = (token in self._eos and not params.ignore_eos) or token in params.stop_token_ids
        reason: str | None = None
        if ends or seq.text.push(token) or grammar_done:  # an ending token adds no text
            reason = "stop"
        elif seq.completion_tokens >= params.max_tokens or len(seq.tokens) >= self.max_model_len:
            reason = "length"
        if reason is not None and seq.text.flush():
            reason = "stop"
        want_lp = seq.completion_tokens == 1 and params.prompt_logprobs is not None
        prompt_lp = tuple(seq.prompt_logprobs) if want_lp else None
        if reason is not None:
            self._planner.remove(seq)
        return StepOutput(
            request_id=seq.request_id,
            text_delta=seq.text.release(finished=reason is not None),
            token_ids=(token,),
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.completion_tokens,
            compute_ms=seq.compute_ms,
            logprobs=(logprob,) if logprob is not None else (),
            prompt_logprobs=prompt_lp,
        )

    # ------------------------------------------------------------------ admission

    def _admit(self, request: GenerationRequest) -> StepOutput | None:
        """Queue ``request``; return a finished error output instead if it cannot run."""
        rid = request.request_id
        if self._planner.find(rid) is not None:
            return refusal(rid, InvalidRequest("request_id is already running", field="request_id"))
        slot = request.adapter_slot
        namespace = ""
        if slot is not None:
            digest = None if self._lora_pool is None else self._lora_pool.resident().get(slot)
            if digest is None:
                message = f"adapter slot {slot} holds no adapter on this engine"
                return refusal(rid, InvalidRequest(message, field="adapter"))
            namespace = digest
        ids = self._encode(request.prompt)
        if not ids:
            return refusal(rid, InvalidRequest("empty prompt and no BOS token", field="prompt"))
        if len(ids) > self.max_model_len - 1:
            message = f"prompt is {len(ids)} tokens; at most {self.max_model_len - 1} fit"
            return refusal(rid, InvalidRequest(message, field="prompt"), prompt_tokens=len(ids))
        params = request.params
        try:
            sampler = self._sampler.new_row(params, ids)
        except VajraError as exc:
            return refusal(rid, exc, prompt_tokens=len(ids))
        self._planner.add(
            Sequence(
                request=request,
                prompt_len=len(ids),
                tokens=list(ids),
                namespace=namespace,
                sampler=sampler,
                text=TextStream(self.tokenizer, ids, params.stop),
                want_prompt_logprobs=params.prompt_logprobs is not None,
            )
        )
        return None

    def _encode(self, prompt: str) -> list[int]:
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        ids: list[int] = list(self.tokenizer.encode(prompt, add_special_tokens=add_special))
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]
        return ids
