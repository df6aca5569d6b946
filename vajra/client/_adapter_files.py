"""Reading a PEFT adapter for upload, from a directory or from memory: its two files, and
nothing pickled."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vajra.errors import InvalidRequest

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def read_adapter_dir(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` bytes of a PEFT adapter directory.

    ``path`` may also name either file inside it. Raises InvalidRequest (field ``path``) when
    a file is missing; a directory holding only a pickled ``adapter_model.bin`` is refused
    here, since only safetensors is accepted.
    """
    p = Path(path)
    if p.is_file():
        p = p.parent
    config, weights = p / ADAPTER_CONFIG_FILE, p / ADAPTER_WEIGHTS_FILE
    if not config.is_file():
        raise InvalidRequest(f"{p} has no {ADAPTER_CONFIG_FILE}", field="path")
    if not weights.is_file():
        if (p / "adapter_model.bin").exists():
            raise InvalidRequest(
                f"{p} holds adapter_model.bin (a pickle); only safetensors is accepted: "
                "save with safe_serialization=True",
                field="path",
            )
        raise InvalidRequest(f"{p} has no {ADAPTER_WEIGHTS_FILE}", field="path")
    return config.read_bytes(), weights.read_bytes()


def adapter_bytes_from_tensors(
    tensors: Mapping[str, Any], lora_config: Mapping[str, Any]
) -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` bytes of an adapter held in memory.

    ``tensors``: PEFT state-dict names (``...lora_A.weight`` / ``...lora_B.weight``) to torch
    tensors or numpy arrays (copied to the CPU, made contiguous); ``lora_config``: the PEFT
    ``adapter_config.json`` as a mapping (``peft_type`` defaults to ``"LORA"``). Only the shape
    of the input is checked here (InvalidRequest, field ``tensors`` or ``lora_config``); the
    gateway validates the result exactly as it validates a directory push.
    """
    import numpy as np

    if not isinstance(lora_config, Mapping) or not all(isinstance(k, str) for k in lora_config):
        raise InvalidRequest("lora_config must be a mapping with string keys", field="lora_config")
    try:
        config = json.dumps({"peft_type": "LORA", **lora_config}, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"lora_config is not plain JSON: {exc}", field="lora_config") from None
    if not isinstance(tensors, Mapping) or not tensors:
        raise InvalidRequest("tensors must be a non-empty mapping", field="tensors")
    if not all(isinstance(k, str) and k for k in tensors):
        raise InvalidRequest("tensor names must be non-empty strings", field="tensors")
    if all(isinstance(t, np.ndarray) for t in tensors.values()):
        from safetensors.numpy import save as save_numpy

        arrays = {k: np.ascontiguousarray(t) for k, t in tensors.items()}
        if any(a.dtype == object for a in arrays.values()):
            raise InvalidRequest("tensors must hold numbers", field="tensors")
        return config, save_numpy(arrays)
    import torch
    from safetensors.torch import save as save_torch

    out: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        if isinstance(t, np.ndarray):
            if t.dtype == object:
                raise InvalidRequest("tensors must hold numbers", field="tensors")
            t = torch.from_numpy(np.ascontiguousarray(t))
        if not isinstance(t, torch.Tensor):
            raise InvalidRequest(
                f"tensor {k!r} is a {type(t).__name__}, not a torch tensor or numpy array",
                field="tensors",
            )
        out[k] = t.detach().to("cpu").contiguous()
    return config, save_torch(out)
