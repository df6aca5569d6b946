"""LoRA training on the serving engine's frozen core: no copy of the base weights.

The trainer holds only the job's LoRA ``A`` [r, in] and ``B`` [out, r] per targeted module
(float32 master weights) and their AdamW state. It trains the very module objects the engine
serves with: for the duration of one micro-step (its forward *and* its backward), it

1. registers a forward hook on each targeted linear (the engine's ``MultiLoraLinear`` wrapper,
   or a plain ``nn.Linear``) that adds ``scale * (x @ A^T) @ B^T`` to its output, PEFT's
   LoRA formula (``scale = alpha / rank``, no dropout);
2. switches the model's attention implementation from the engine's paged one to torch's
   ``sdpa`` (transformers reads it on every forward), and, with gradient checkpointing, puts
   the model in training mode with transformers' non-reentrant checkpointing on;

and undoes all three in a ``finally`` before it returns, on the same thread. An inference step
run between micro-steps therefore sees the model exactly as it was: no hook, paged attention,
eval mode. The base parameters keep ``requires_grad=False``; gradients reach ``A`` and ``B``
only.

Loss (the same as the PEFT comparison in the tests): the sum of the cross-entropies of an
optimizer step's *target* tokens (:mod:`vajra.gpu.training.tokenize`) divided by the number of
target tokens of the whole step. Each micro-step back-propagates its share, so gradient
accumulation and the split into micro-steps do not change the result (beyond float rounding).

Order and seeds (:mod:`vajra.policies.training`): the examples of each optimizer step come
from a shuffle seeded by ``(seed, epoch)``; ``A`` is drawn like PEFT (Kaiming-uniform with
``a = sqrt(5)``) from a CPU generator seeded by ``seed``, in module order, then moved to the
device; ``B`` is zero. Nothing else is random, so a run is deterministic and a checkpoint
needs no RNG state.

On CUDA the micro-steps run on their own stream of CUDA's *lowest* priority, below the
engine's steps (:mod:`vajra.gpu.streams`), under bf16 autocast; the one synchronisation per optimizer step is reading its loss. Errors: bad
targets or init weights raise :class:`~vajra.errors.InvalidRequest` at construction, before
any device work; an exception inside a micro-step propagates after the model was restored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn
from torch.nn import functional as F

from vajra.gpu.streams import TRAINING_PRIORITY, priority_stream
from vajra.gpu.training.checkpoint import load_checkpoint, save_checkpoint
from vajra.gpu.training.targets import make_targets
from vajra.gpu.training.tokenize import TrainExample
from vajra.policies.training import TrainParams, micro_batches, step_examples
from vajra.training.dataset import InvalidDataset

IGNORE = -100


@dataclass(frozen=True, slots=True)
class StepReport:
    """One completed optimizer step. ``gradients``: the trainable parameters updated by it
    (what billing counts); ``gpu_ms``: device time of its micro-steps."""

    step: int  # optimizer steps completed so far (1-based)
    epoch: int  # the step's epoch (0-based)
    loss: float  # mean cross-entropy over the step's target tokens
    tokens: int  # tokens the step processed (no padding)
    gradients: int
    gpu_ms: float
    done: bool  # the job's last step


class LoraTrainer:
    """Trains one LoRA adapter on ``engine_or_model``'s frozen core (module docstring).

    ``engine_or_model``: a :class:`~vajra.gpu.engine.TorchEngine` (its ``model``) or a
    transformers causal LM. ``examples``: tokenized (``tokenize_examples``). ``init``: a PEFT
    state dict to continue from (its modules and rank replace ``params.target_modules`` and
    ``params.rank``; ``init_alpha`` its ``lora_alpha``, default ``params.alpha``).
    """

    def __init__(
        self,
        engine_or_model: Any,
        tokenizer: Any,
        examples: Sequence[TrainExample],
        params: TrainParams,
        *,
        init: Mapping[str, torch.Tensor] | None = None,
        init_alpha: float | None = None,
    ) -> None:
        model = engine_or_model if isinstance(engine_or_model, nn.Module) else engine_or_model.model
        self._model: Any = model
        self.params = params
        self._examples = list(examples)
        if not self._examples:
            raise InvalidDataset("the dataset has no examples")
        for number, example in enumerate(self._examples, start=1):
            if len(example.input_ids) > params.max_micro_tokens:
                raise InvalidDataset(
                    f"{len(example.input_ids)} tokens, over max_micro_tokens="
                    f"{params.max_micro_tokens}",
                    line=number,
                )
        self._pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.device = next(model.parameters()).device
        self._targets = make_targets(model, params, init, self.device)
        self.rank = self._targets[0].a.shape[0]
        self.alpha = float(init_alpha if init_alpha is not None else params.alpha)
        self.scale = self.alpha / self.rank
        self.target_modules = tuple(sorted({t.path.rsplit(".", 1)[-1] for t in self._targets}))
        self._trainable = [p for t in self._targets for p in (t.a, t.b)]
        self.num_trainable = sum(p.numel() for p in self._trainable)
        self._optimizer = torch.optim.AdamW(
            self._trainable, lr=params.learning_rate, weight_decay=params.weight_decay
        )
        self._plan = step_examples(len(self._examples), params)
        self.total_steps = len(self._plan)
        self._steps_per_epoch = -(-len(self._examples) // params.examples_per_step)
        self.step = 0  # optimizer steps completed
        self._micro: list[list[TrainExample]] = []
        self._micro_index = 0
        self._step_targets = 0
        self._loss = torch.zeros((), device=self.device)
        self._ms = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._closed = False
        self._stream: Any = priority_stream(self.device, TRAINING_PRIORITY)  # None on the CPU

    # ------------------------------------------------------------------ public

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def micro_step(self) -> StepReport | None:
        """Run one micro-step (at most ``params.max_micro_tokens`` tokens, padding included).

        Returns a :class:`StepReport` when it completed an optimizer step, else None (and None
        once finished). The model is restored before this returns or raises."""
        if self._closed:
            raise RuntimeError("the trainer is closed")
        if self.finished:
            return None
        with ExitStack() as stack:
            if self._stream is not None:
                # after what the thread queued before (init copies, a restored state)
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                stack.enter_context(torch.cuda.stream(self._stream))
            if not self._micro:
                self._start_step()
            batch = self._micro[self._micro_index]
            if self._stream is not None:
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record()
            began = time.perf_counter()
            with self._attached():
                loss = self._forward(batch)
                loss.backward()  # type: ignore[no-untyped-call]
            self._loss += loss.detach()
            if self._stream is not None:
                end.record()
                self._events.append((start, end))
            else:
                self._ms += (time.perf_counter() - began) * 1000.0
            self._micro_index += 1
            if self._micro_index < len(self._micro):
                return None
            return self._finish_step()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter in PEFT's safetensors naming, float32 on the CPU."""
        out: dict[str, torch.Tensor] = {}
        for t in self._targets:
            key = f"base_model.model.{t.path}"
            out[f"{key}.lora_A.weight"] = t.a.detach().float().cpu().clone()
            out[f"{key}.lora_B.weight"] = t.b.detach().float().cpu().clone()
        return out

    def adapter_config(self) -> dict[str, Any]:
        """A PEFT ``adapter_config.json`` for :meth:`adapter_tensors`."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "rank_pattern": {},
            "alpha_pattern": {},
            "base_model_name_or_path": str(getattr(self._model.config, "_name_or_path", "")),
        }

    def adapter_files(self) -> tuple[bytes, bytes]:
        """``(adapter_config.json, adapter_model.safetensors)`` bytes: a PEFT adapter that
        :func:`~vajra.adapters.format.validate_adapter` accepts and PEFT loads."""
        config = json.dumps(self.adapter_config(), sort_keys=True).encode()
        return config, bytes(st_save(self.adapter_tensors(), metadata={"format": "pt"}))

    def checkpoint(self) -> bytes:
        """Safetensors bytes of A/B, the AdamW state and the position (completed optimizer
        steps; a partly accumulated step is redone after a restore). Never pickle."""
        return save_checkpoint(self)

    @classmethod
    def restore(
        cls,
        engine_or_model: Any,
        tokenizer: Any,
        examples: Sequence[TrainExample],
        params: TrainParams,
        *,
        checkpoint: bytes,
    ) -> LoraTrainer:
        """A trainer that continues exactly where ``checkpoint`` was taken. Raises
        :class:`InvalidRequest` (field ``checkpoint``) for bytes that are not a checkpoint of
        this job (other parameters, dataset size or modules)."""
        state = load_checkpoint(checkpoint, params, len(examples))
        trainer = cls(
            engine_or_model, tokenizer, examples, params, init=state.tensors, init_alpha=state.alpha
        )
        trainer._optimizer.load_state_dict(state.optimizer_state(trainer._optimizer))
        trainer.step = state.step
        return trainer

    def close(self) -> None:
        """Drop the trainable tensors and the optimizer; the model is already as it was."""
        self._closed = True
        self._optimizer.state.clear()
        self._targets = []
        self._trainable = []

    # ------------------------------------------------------------------ internals

    def _start_step(self) -> None:
        chosen = [self._examples[i] for i in self._plan[self.step]]
        cuts = micro_batches(
            [len(e.input_ids) for e in chosen],
            max_tokens=self.params.max_micro_tokens,
            max_rows=self.params.batch_size,
        )
        self._micro = [[chosen[i] for i in cut] for cut in cuts]
        self._micro_index = 0
        self._step_targets = sum(e.num_targets for e in chosen)
        self._loss = torch.zeros((), device=self.device)
        self._ms = 0.0
        self._events = []

    def _finish_step(self) -> StepReport:
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        loss = float(self._loss)  # the step's one synchronisation
        ms = self._ms + sum(s.elapsed_time(e) for s, e in self._events)
        tokens = sum(len(e.input_ids) for batch in self._micro for e in batch)
        epoch = self.step // self._steps_per_epoch
        self.step += 1
        self._micro = []
        return StepReport(
            step=self.step,
            epoch=epoch,
            loss=loss,
            tokens=tokens,
            gradients=self.num_trainable,
            gpu_ms=ms,
            done=self.finished,
        )

    def _forward(self, batch: list[TrainExample]) -> torch.Tensor:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self._pad, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            mask[row, :n] = 1
            labels[row, :n] = torch.where(
                torch.tensor(e.loss_mask), torch.tensor(e.input_ids), IGNORE
            )
        ids, labels, mask = (t.to(self.device, non_blocking=True) for t in (ids, labels, mask))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            out = self._model(input_ids=ids, attention_mask=mask, use_cache=False)
        logits = out.logits[:, :-1].float()
        total = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        return total / self._step_targets

    @contextmanager
    def _attached(self) -> Iterator[None]:
        """The model as training sees it, for one micro-step; restored in ``finally``."""
        model = self._model
        attention = model.config._attn_implementation
        handles = []
        checkpointing = self.params.gradient_checkpointing
        try:
            for t in self._targets:
                handles.append(t.module.register_forward_hook(_lora_hook(t.a, t.b, self.scale)))
            if attention != "sdpa":
                model.set_attn_implementation("sdpa")
            if checkpointing:
                kwargs = {"use_reentrant": False}
                if hasattr(model, "activation_checkpointing_enable"):
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
                else:  # transformers before the rename
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
                model.train()
            yield
        finally:
            for handle in handles:
                handle.remove()
            if checkpointing:
                disable = getattr(model, "activation_checkpointing_disable", None)
                (disable or model.gradient_checkpointing_disable)()
                model.eval()
            if model.config._attn_implementation != attention:
                model.set_attn_implementation(attention)


def _lora_hook(a: torch.Tensor, b: torch.Tensor, scale: float) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        delta = F.linear(F.linear(x, a), b) * scale
        return output + delta.to(output.dtype)

    return hook
