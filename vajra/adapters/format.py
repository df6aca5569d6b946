"""PEFT LoRA adapters on disk: validate ``adapter_config.json`` + ``adapter_model.safetensors``
against a base model and describe the result in an :class:`AdapterManifest`.

Pure code: no torch import at module level and no I/O beyond reading a model's ``config.json``.
The config is read by :mod:`vajra.adapters.peft_config` and the weights' header by
:mod:`vajra.adapters.safetensors_header`; this module checks that the two agree with each
other and with the base.

What is accepted is plain LoRA as PEFT saves it for a Llama-family model (see
:mod:`~vajra.adapters.peft_config` for the config's subset): float32/float16/bfloat16 weights,
all finite, a ``lora_A`` [r, in] and a ``lora_B`` [out, r] for each targeted linear module of
the base. Ranks and alphas may differ per module (``rank_pattern`` / ``alpha_pattern``); the
scale is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.

Every input is a tenant's, so validation is bounded (see :mod:`vajra.adapters.untrusted` for
why it cannot stall the event loop of the thread's process): the config and the header are
size-capped and decoded with bounded depth, ``target_modules`` and pattern keys are matched by
RE2 with PEFT's exact semantics, weights are scanned for NaN and Inf, and the whole is under
a time budget. Any problem is an :class:`InvalidAdapter` naming it; no other exception escapes
for any bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vajra.adapters.peft_config import (
    PatternTable,
    TargetModules,
    alpha_value,
    dot_suffixes,
    parse_config,
)
from vajra.adapters.safetensors_header import read_safetensors_header
from vajra.adapters.untrusted import (
    DEFAULT_BUDGET_S,
    Budget,
    InvalidAdapter,
    first_non_finite,
    show,
)

#: safetensors dtype name -> bytes per element, for the dtypes an adapter may use.
SAFETENSORS_DTYPES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
#: The linear layers Vajra's multi-LoRA layer serves on Llama-family models (PEFT's usual targets).
SERVABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$"
)
_HASH_CHUNK_BYTES = 16 * 1024 * 1024

__all__ = [
    "SAFETENSORS_DTYPES",
    "SERVABLE_MODULES",
    "AdapterManifest",
    "BaseModelSpec",
    "InvalidAdapter",
    "adapter_digest",
    "base_model_spec",
    "parse_lora_key",
    "validate_adapter",
    "validate_adapter_dir",
]


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must match: the base's linear modules and their shapes."""

    model_type: str
    modules: dict[str, tuple[int, int]]  # module path -> (in_features, out_features)

    def __hash__(self) -> int:
        return hash((self.model_type, tuple(sorted(self.modules.items()))))


@dataclass(frozen=True)
class AdapterManifest:
    """A validated adapter: everything needed to place it without re-reading the config."""

    rank: int  # max over modules
    ranks: dict[str, int]  # module path -> r
    lora_alpha: float
    alphas: dict[str, float]  # module path -> alpha
    target_modules: tuple[str, ...]  # short names, e.g. ("q_proj", "v_proj")
    modules: tuple[str, ...]  # full module paths, sorted
    use_rslora: bool
    dtype: str  # safetensors dtype of the weights ("F32", "F16", "BF16"; "mixed" if they differ)
    size_bytes: int  # config + weights
    digest: str  # sha256 hex over the config bytes then the weights bytes
    tensors: dict[str, tuple[str, str]]  # module path -> (lora_A key, lora_B key) in the file

    def scale(self, module: str) -> float:
        """The factor PEFT applies to ``B @ A`` for ``module``."""
        r = self.ranks[module]
        alpha = self.alphas[module]
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def __hash__(self) -> int:
        return hash(self.digest)


def adapter_digest(config_json: bytes, weights: bytes, *, budget: Budget | None = None) -> str:
    """sha256 hex over the config bytes then the weights bytes (hashed in chunks, GIL released)."""
    h = hashlib.sha256()
    h.update(config_json)
    view = memoryview(weights)
    for first in range(0, len(view), _HASH_CHUNK_BYTES):
        if budget is not None:
            budget.check()
        h.update(view[first : first + _HASH_CHUNK_BYTES])
    return h.hexdigest()


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.<path>.lora_A[.<adapter>].weight`` -> (path, "A"); None if not LoRA A/B."""
    m = _KEY.match(key)
    if m is None:
        return None
    return m.group("module"), m.group("which")


def validate_adapter(
    config_json: bytes,
    weights: bytes,
    base: BaseModelSpec,
    *,
    max_rank: int,
    max_bytes: int,
    servable: Collection[str] | None = SERVABLE_MODULES,
    budget_s: float | None = DEFAULT_BUDGET_S,
) -> AdapterManifest:
    """Check a PEFT LoRA adapter against ``base`` and the limits; return its manifest.

    ``servable``: the short module names an adapter may carry weights for (None: any linear
    module of the base). ``budget_s``: the most time validation may take (None: no limit);
    past it the adapter is refused as too complex. Raises :class:`InvalidAdapter`
    (``field="adapter"``) naming the first problem found, and nothing else, whatever the bytes.
    """
    budget = Budget(budget_s)
    size = len(config_json) + len(weights)
    if size > max_bytes:
        raise InvalidAdapter(f"adapter is {size} bytes; the limit is {max_bytes}")
    config = parse_config(config_json)
    target: str | list[str] = config["target_modules"]
    targets = TargetModules(target)
    rank_table = PatternTable(config.get("rank_pattern") or {}, field="rank_pattern", budget=budget)
    alpha_table = PatternTable(
        config.get("alpha_pattern") or {}, field="alpha_pattern", budget=budget
    )
    infos = read_safetensors_header(weights, budget=budget)
    if not infos:
        raise InvalidAdapter("adapter_model.safetensors holds no tensors")

    targeted: set[str] = set()
    for module in base.modules:
        budget.check()
        if targets.hit(module):
            targeted.add(module)
    if isinstance(target, list):
        known = {s for m in base.modules for s in (m, *dot_suffixes(m))}
        missing = [t for t in target if t not in known]
        if missing:
            raise InvalidAdapter(
                f"target_modules {show(missing, 200)} name modules the {base.model_type} "
                "base model lacks"
            )
    elif not targeted:
        raise InvalidAdapter(
            f"target_modules regex {show(target)} matches no module of the base model"
        )

    pairs: dict[str, dict[str, str]] = {}
    for key in infos:
        budget.check()
        parsed = parse_lora_key(key)
        if parsed is None:
            raise InvalidAdapter(
                f"unsupported tensor {show(key)}: only lora_A/lora_B weights are served"
            )
        module, which = parsed
        if module not in base.modules:
            raise InvalidAdapter(
                f"tensor {show(key)} targets {show(module)}, which the base model lacks"
            )
        if servable is not None and module.rsplit(".", 1)[-1] not in servable:
            raise InvalidAdapter(
                f"tensor {key!r}: LoRA on {module!r} is not served (only {', '.join(servable)})"
            )
        if which in pairs.setdefault(module, {}):
            raise InvalidAdapter(f"module {module!r} has two lora_{which} tensors")
        pairs[module][which] = key

    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dtypes: set[str] = set()
    for module, pair in sorted(pairs.items()):
        budget.check()
        for which in ("A", "B"):
            if which not in pair:
                raise InvalidAdapter(f"module {module!r} has no lora_{which} weight")
        a, b = infos[pair["A"]], infos[pair["B"]]
        for info, key in ((a, pair["A"]), (b, pair["B"])):
            if info.dtype not in SAFETENSORS_DTYPES:
                raise InvalidAdapter(
                    f"tensor {key!r} has dtype {info.dtype}; only F32, F16 and BF16 are accepted"
                )
            dtypes.add(info.dtype)
        in_features, out_features = base.modules[module]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise InvalidAdapter(f"module {module!r}: lora_A/lora_B must be 2-D")
        r = a.shape[0]
        if a.shape != (r, in_features) or b.shape != (out_features, r):
            raise InvalidAdapter(
                f"module {module!r}: shapes A {list(a.shape)} B {list(b.shape)} do not match the "
                f"base layer ({in_features} in, {out_features} out)"
            )
        if r == 0:
            raise InvalidAdapter(f"module {module!r} has rank 0")
        declared = rank_table.value(module, config["r"], budget)
        if declared != r:
            raise InvalidAdapter(
                f"module {module!r}: weights have rank {r}, config says {show(declared)}"
            )
        if r > max_rank:
            raise InvalidAdapter(f"module {module!r} has rank {r}; the limit is {max_rank}")
        if module not in targeted:
            raise InvalidAdapter(f"module {module!r} has weights but is not in target_modules")
        declared_alpha = alpha_table.value(module, config.get("lora_alpha", 8), budget)
        alpha = alpha_value(declared_alpha)
        if alpha is None:
            raise InvalidAdapter(
                f"module {module!r}: alpha {show(declared_alpha)} is not a finite number "
                "(within float32 range)"
            )
        ranks[module] = r
        alphas[module] = alpha

    for _, pair in sorted(pairs.items()):
        for key in (pair["A"], pair["B"]):
            info = infos[key]
            found = first_non_finite(weights, info.start, info.end, info.dtype, budget)
            if found is not None:
                index, kind = found
                raise InvalidAdapter(
                    f"tensor {key!r} holds a non-finite weight ({kind} at flat index {index}); "
                    "NaN and infinite weights are refused"
                )

    short = sorted({m.rsplit(".", 1)[-1] for m in pairs})
    return AdapterManifest(
        rank=max(ranks.values()),
        ranks=ranks,
        lora_alpha=float(config.get("lora_alpha", 8)),
        alphas=alphas,
        target_modules=tuple(short),
        modules=tuple(sorted(pairs)),
        use_rslora=bool(config.get("use_rslora", False)),
        dtype=dtypes.pop() if len(dtypes) == 1 else "mixed",
        size_bytes=size,
        digest=adapter_digest(config_json, weights, budget=budget),
        tensors={m: (p["A"], p["B"]) for m, p in sorted(pairs.items())},
    )


def validate_adapter_dir(
    path: Path,
    base: BaseModelSpec,
    *,
    max_rank: int,
    max_bytes: int,
    servable: Collection[str] | None = SERVABLE_MODULES,
    budget_s: float | None = DEFAULT_BUDGET_S,
) -> AdapterManifest:
    """:func:`validate_adapter` on a PEFT directory; a ``.bin`` instead of safetensors is refused."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise InvalidAdapter(f"{path} has no adapter_config.json")
    if not weights_file.is_file():
        if (path / "adapter_model.bin").exists():
            raise InvalidAdapter("adapter_model.bin is a pickle file; only safetensors is accepted")
        raise InvalidAdapter(f"{path} has no adapter_model.safetensors")
    size = config_file.stat().st_size + weights_file.stat().st_size
    if size > max_bytes:
        raise InvalidAdapter(f"adapter is {size} bytes; the limit is {max_bytes}")
    return validate_adapter(
        config_file.read_bytes(),
        weights_file.read_bytes(),
        base,
        max_rank=max_rank,
        max_bytes=max_bytes,
        servable=servable,
        budget_s=budget_s,
    )


def base_model_spec(model_dir: Path) -> BaseModelSpec:
    """The linear modules of the model in ``model_dir``, from its ``config.json`` alone.

    The model is built on the meta device (no memory, no weights read). Results are cached per
    config content, so calling this per upload is cheap.
    """
    config_bytes = (Path(model_dir) / "config.json").read_bytes()
    return _spec_from_config(config_bytes)


@lru_cache(maxsize=16)
def _spec_from_config(config_bytes: bytes) -> BaseModelSpec:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads(config_bytes)
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    modules = {
        name: (int(mod.in_features), int(mod.out_features))
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear)
    }
    return BaseModelSpec(model_type=str(model_type), modules=modules)
