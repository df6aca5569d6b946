"""A training job's checkpoint: safetensors bytes (never pickle) that resume it bit-identically.

Tensors: the adapter in PEFT's naming (``base_model.model.<path>.lora_A.weight`` / ``lora_B``)
and, per trainable tensor ``i`` in the trainer's order, ``optimizer.<i>.step``,
``optimizer.<i>.exp_avg`` and ``optimizer.<i>.exp_avg_sq`` (AdamW's state). Metadata (strings):
``format``, ``step`` (completed optimizer steps), ``alpha``, ``examples`` (dataset size) and
``params`` (the job's parameters as JSON). The data order and every random draw derive from
the seed and the position alone (:mod:`vajra.policies.training`), so no RNG state is needed.

:func:`load_checkpoint` refuses (``InvalidRequest``, field ``checkpoint``) bytes that are not
such a file, or one written for other parameters or another dataset size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vajra.errors import InvalidRequest
from vajra.policies.training import TrainParams

if TYPE_CHECKING:
    from vajra.gpu.training.trainer import LoraTrainer

FORMAT = "vajra-lora-train/1"
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class CheckpointState:
    step: int
    alpha: float
    tensors: dict[str, torch.Tensor]  # the adapter, PEFT keys
    optimizer: dict[int, dict[str, torch.Tensor]]  # per trainable tensor index

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.load_state_dict``'s argument for an optimizer over the same tensors."""
        groups = optimizer.state_dict()["param_groups"]
        count = sum(len(g["params"]) for g in groups)
        if set(self.optimizer) - set(range(count)):
            raise InvalidRequest("checkpoint optimizer state does not fit", field="checkpoint")
        return {"state": dict(self.optimizer), "param_groups": groups}


def save_checkpoint(trainer: LoraTrainer) -> bytes:
    tensors = trainer.adapter_tensors()
    state = trainer._optimizer.state
    for i, param in enumerate(trainer._trainable):
        for key in _STATE_KEYS:
            value = state.get(param, {}).get(key)
            if value is not None:
                tensors[f"optimizer.{i}.{key}"] = value.detach().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "step": str(trainer.step),
        "alpha": repr(trainer.alpha),
        "examples": str(len(trainer._examples)),
        "params": json.dumps(trainer.params.to_dict(), sort_keys=True),
    }
    return bytes(st_save(tensors, metadata=metadata))


def load_checkpoint(data: bytes, params: TrainParams, num_examples: int) -> CheckpointState:
    try:
        tensors = st_load(bytes(data))
        metadata = _metadata(data)
    except (SafetensorError, ValueError, TypeError, OSError) as exc:
        raise InvalidRequest(f"not a training checkpoint: {exc}", field="checkpoint") from None
    if metadata.get("format") != FORMAT:
        raise InvalidRequest("not a training checkpoint (format)", field="checkpoint")
    try:
        saved = TrainParams.from_dict(json.loads(metadata["params"]))
        step, alpha = int(metadata["step"]), float(metadata["alpha"])
        examples = int(metadata["examples"])
    except (KeyError, ValueError, InvalidRequest):
        raise InvalidRequest(
            "training checkpoint metadata is damaged", field="checkpoint"
        ) from None
    if saved != params or examples != num_examples:
        raise InvalidRequest(
            "the checkpoint belongs to a job with other parameters or another dataset",
            field="checkpoint",
        )
    adapter = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            if not index.isdigit() or name not in _STATE_KEYS:
                raise InvalidRequest(f"unexpected checkpoint tensor {key!r}", field="checkpoint")
            optimizer.setdefault(int(index), {})[name] = value
    return CheckpointState(step=step, alpha=alpha, tensors=adapter, optimizer=optimizer)


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (8-byte little-endian length, then JSON)."""
    size = int.from_bytes(data[:8], "little")
    if size <= 0 or size > len(data) - 8:
        raise ValueError("bad safetensors header")
    header = json.loads(data[8 : 8 + size])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("bad safetensors metadata")
    return {str(k): str(v) for k, v in meta.items()}
