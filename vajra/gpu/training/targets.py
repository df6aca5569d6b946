"""The trainable LoRA tensors of a job: which linears it targets, and their A/B.

Fresh adapters are drawn as PEFT draws them (``A``: Kaiming-uniform with ``a = sqrt(5)`` from a
CPU generator seeded with the job's seed, module by module in model order; ``B``: zeros). An
adapter to continue from is a PEFT state dict; its modules and rank replace the job's. Any
mismatch raises :class:`~vajra.errors.InvalidRequest` (field ``target_modules`` or ``init``)
before anything touches a device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from vajra.errors import InvalidRequest
from vajra.gpu.lora.layer import MultiLoraLinear
from vajra.policies.training import TrainParams


@dataclass(eq=False)
class Target:
    path: str  # module path in the model, e.g. model.layers.0.self_attn.q_proj
    module: nn.Module  # what the hook sits on (the wrapper, or the plain linear)
    a: torch.Tensor  # [r, in] float32, trainable
    b: torch.Tensor  # [out, r] float32, trainable


def make_targets(
    model: nn.Module,
    params: TrainParams,
    init: Mapping[str, torch.Tensor] | None,
    device: torch.device,
) -> list[Target]:
    """The targeted linears and their A/B: fresh (PEFT's init, seeded) or from ``init``."""
    wanted = set(params.target_modules)
    if init is not None:
        wanted = set()
        for key in init:
            if not key.startswith("base_model.model.") or not key.endswith(
                (".lora_A.weight", ".lora_B.weight")
            ):
                raise InvalidRequest(f"init weight {key!r} is not a PEFT LoRA key", field="init")
            wanted.add(key.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight"))
        wanted = {w.rsplit(".", 1)[-1] for w in wanted}
    found: list[tuple[str, nn.Module, int, int]] = []
    for path, module in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        if name not in wanted:
            continue
        linear = module.base_layer if isinstance(module, MultiLoraLinear) else module
        if isinstance(linear, nn.Linear):
            found.append((path, module, linear.in_features, linear.out_features))
    missing = wanted - {p.rsplit(".", 1)[-1] for p, _, _, _ in found}
    if missing:
        raise InvalidRequest(
            f"the model has no linear module named {sorted(missing)[0]!r}", field="target_modules"
        )
    generator = torch.Generator().manual_seed(params.seed)
    targets = []
    for path, module, fan_in, fan_out in found:
        if init is None:
            a = torch.empty(params.rank, fan_in)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            b = torch.zeros(fan_out, params.rank)
        else:
            a, b = _init_pair(init, path, fan_in, fan_out)
        a = a.to(device=device, dtype=torch.float32).requires_grad_(True)
        b = b.to(device=device, dtype=torch.float32).requires_grad_(True)
        targets.append(Target(path=path, module=module, a=a, b=b))
    ranks = {t.a.shape[0] for t in targets}
    if len(ranks) != 1:
        raise InvalidRequest("init weights have different ranks per module", field="init")
    return targets


def _init_pair(
    init: Mapping[str, torch.Tensor], path: str, fan_in: int, fan_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    key = f"base_model.model.{path}"
    a, b = init.get(f"{key}.lora_A.weight"), init.get(f"{key}.lora_B.weight")
    if a is None or b is None:
        raise InvalidRequest(f"init weights lack module {path!r}", field="init")
    r = a.shape[0]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != fan_in or tuple(b.shape) != (fan_out, r):
        raise InvalidRequest(f"init weights of {path!r} do not fit the model", field="init")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise InvalidRequest(f"init weights of {path!r} are not finite", field="init")
    return a.detach().clone().float(), b.detach().clone().float()
