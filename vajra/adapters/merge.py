"""An exact weighted merge of two versions of one adapter, by concatenation along the rank.

Two LoRA versions change a module's weight by ``s1 B1 A1`` and ``s2 B2 A2`` (``s = alpha / r``,
or ``alpha / sqrt(r)`` with rsLoRA). Their weighted sum ``w1 s1 B1 A1 + w2 s2 B2 A2`` is itself
a LoRA update, of rank ``r1 + r2``::

    A = [w1 s1 A1 ; w2 s2 A2]   (rows stacked)      B = [B1 | B2]   (columns side by side)

with scaling 1 (``lora_alpha = r = r1 + r2``). This is PEFT's
``add_weighted_adapter(..., combination_type="cat")``, tensor for tensor. Averaging the two
A and the two B matrices separately would not give the average of the updates
(``(wB1 + (1-w)B2)(wA1 + (1-w)A2)`` has cross terms), so that is not offered.

Both versions must carry weights for the same modules (the same tensor names), as plain LoRA
without ``rank_pattern`` or ``alpha_pattern``; the result must still fit ``adapters.max_rank``
(the gateway validates it like any upload). ``w1`` and ``w2`` are any finite numbers, not both
zero (``1, 1`` adds the updates, ``0.5, 0.5`` averages them, ``1, -1`` subtracts).

Errors: InvalidRequest naming the field (``versions``, ``weights``), InvalidAdapter for a
config that is not plain LoRA, InternalError for weights that cannot be read; the computation
is blocking (run it in a worker thread).
"""

from __future__ import annotations

import json
import math
from typing import Any

from vajra.errors import InternalError, InvalidRequest

__all__ = ["check_merge_args", "merge_versions"]

_A, _B = ".lora_A.weight", ".lora_B.weight"


def _scaling(config: dict[str, Any]) -> float:
    r = int(config["r"])
    alpha = float(config.get("lora_alpha", r))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def check_merge_args(
    versions: object, weights: object
) -> tuple[tuple[int, int], tuple[float, float]]:
    """The two versions (positive integers) and two weights (finite, not both zero) of a merge;
    InvalidRequest naming ``versions`` or ``weights`` otherwise. The one check the SDK, the
    gateway and :func:`merge_versions` apply."""
    if (
        not isinstance(versions, tuple | list)
        or len(versions) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in versions)
    ):
        raise InvalidRequest("versions must be two positive integers", field="versions")
    if (
        not isinstance(weights, tuple | list)
        or len(weights) != 2
        or any(
            isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w)
            for w in weights
        )
        or not any(weights)
    ):
        raise InvalidRequest("weights must be two finite numbers, not both zero", field="weights")
    return (int(versions[0]), int(versions[1])), (float(weights[0]), float(weights[1]))


def merge_versions(
    first: tuple[bytes, bytes], second: tuple[bytes, bytes], weights: tuple[float, float]
) -> tuple[bytes, bytes]:
    """The merged adapter's ``(adapter_config.json, adapter_model.safetensors)`` from two
    versions' files (see the module docstring)."""
    import torch
    from safetensors.torch import load, save

    from vajra.adapters.peft_config import parse_config

    check_merge_args((1, 1), weights)
    configs = [parse_config(first[0]), parse_config(second[0])]
    for c in configs:
        if c.get("rank_pattern") or c.get("alpha_pattern"):
            raise InvalidRequest(
                "a merge takes adapters without rank_pattern or alpha_pattern", field="versions"
            )
    try:
        tensors = [load(first[1]), load(second[1])]
    except Exception as exc:  # stored files were validated at upload: damaged since
        raise InternalError("a stored adapter version cannot be read") from exc
    if set(tensors[0]) != set(tensors[1]):
        raise InvalidRequest(
            "the two versions must carry weights for the same modules", field="versions"
        )
    if any(not (k.endswith(_A) or k.endswith(_B)) for k in tensors[0]):
        raise InvalidRequest("a merge takes plain LoRA A and B weights only", field="versions")
    scale = [w * _scaling(c) for w, c in zip(weights, configs, strict=True)]
    out: dict[str, torch.Tensor] = {}
    for name, t0 in tensors[0].items():
        t1 = tensors[1][name]
        if name.endswith(_A):
            if t0.shape[1:] != t1.shape[1:]:
                raise InvalidRequest(
                    f"{name} differs in shape between the versions", field="versions"
                )
            merged = torch.cat([t0.float() * scale[0], t1.float() * scale[1]], dim=0)
        else:
            if t0.shape[:1] != t1.shape[:1]:
                raise InvalidRequest(
                    f"{name} differs in shape between the versions", field="versions"
                )
            merged = torch.cat([t0.float(), t1.float()], dim=1)
        out[name] = merged.to(t0.dtype).contiguous()
    rank = int(configs[0]["r"]) + int(configs[1]["r"])
    config = dict(configs[0])
    config.update(r=rank, lora_alpha=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    return json.dumps(config, sort_keys=True).encode(), save(out)
