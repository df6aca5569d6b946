"""PEFT LoRA adapters on disk: parse and validate ``adapter_config.json`` + ``adapter_model.safetensors``.

Pure code: no torch import at module level and no I/O beyond reading a model's ``config.json``.
The safetensors header is parsed here byte by byte (8-byte little-endian header length, then a
JSON header mapping each tensor name to ``{dtype, shape, data_offsets}``), so a pickle file, a
truncated upload or a header whose offsets point past the end is refused before any tensor is
decoded, and nothing outside the checked byte ranges is ever read.

What is accepted is plain LoRA as PEFT saves it for a Llama-family model: ``peft_type`` LORA,
``bias`` "none", no DoRA, no ``modules_to_save``, no ``fan_in_fan_out``, float32/float16/bfloat16
weights, all finite, a ``lora_A`` [r, in] and a ``lora_B`` [out, r] for each targeted linear
module of the base. Ranks and alphas may differ per module (``rank_pattern`` /
``alpha_pattern``); the scale is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.

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
import struct
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from vajra.adapters.untrusted import (
    DEFAULT_BUDGET_S,
    MAX_CONFIG_BYTES,
    Budget,
    InvalidAdapter,
    compile_pattern_keys,
    compile_target_modules,
    decode_json,
    first_non_finite,
    show,
)

#: safetensors dtype name -> bytes per element, for the dtypes an adapter may use.
SAFETENSORS_DTYPES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
_ALL_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip
#: The linear layers Vajra's multi-LoRA layer serves on Llama-family models (PEFT's usual targets).
SERVABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Largest safetensors header accepted: about 150 bytes per tensor, so room for some 14,000
#: tensors, while one decode stays within milliseconds (the safetensors library allows 100 MiB).
MAX_HEADER_BYTES = 2 * 1024 * 1024
_MAX_TENSOR_NAME_CHARS = 1_024
_MAX_NDIM = 8
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$"
)
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")
_HASH_CHUNK_BYTES = 16 * 1024 * 1024
_FLOAT32_MAX = 3.4028234663852886e38

__all__ = [
    "DEFAULT_BUDGET_S",
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "SAFETENSORS_DTYPES",
    "SERVABLE_MODULES",
    "AdapterManifest",
    "BaseModelSpec",
    "InvalidAdapter",
    "TensorInfo",
    "adapter_digest",
    "base_model_spec",
    "parse_lora_key",
    "read_safetensors_header",
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
class TensorInfo:
    """One tensor of a safetensors file, located but not decoded."""

    dtype: str  # safetensors name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets into the file
    end: int


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


def _is_count(value: Any) -> bool:
    """A safetensors dimension or offset: an unsigned 64-bit integer (bounding it also bounds
    the arithmetic and the messages that use it)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def read_safetensors_header(data: bytes, *, budget: Budget | None = None) -> dict[str, TensorInfo]:
    """Parse and bounds-check a safetensors file's header; raise InvalidAdapter naming the fault.

    The header is at most :data:`MAX_HEADER_BYTES` and is decoded with bounded depth, so no
    bytes make this raise anything but InvalidAdapter.
    """
    budget = budget or Budget(None)
    if data[:2] in _PICKLE_MAGIC or data[:4] in _PICKLE_MAGIC:
        raise InvalidAdapter("weights are a pickle/zip file (e.g. .bin or .pt), not safetensors")
    if len(data) < 8:
        raise InvalidAdapter(f"weights are not safetensors: {len(data)} bytes, no header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise InvalidAdapter(
            f"weights are not safetensors or their header is too large: header length "
            f"{header_len} bytes, the limit is {MAX_HEADER_BYTES}"
        )
    if 8 + header_len > len(data):
        raise InvalidAdapter(
            f"weights are not safetensors or truncated: header length {header_len} "
            f"exceeds the {len(data)}-byte file"
        )
    header = decode_json(
        memoryview(data)[8 : 8 + header_len], what="adapter_model.safetensors header", header=True
    )
    if not isinstance(header, dict):
        raise InvalidAdapter("weights are not safetensors: header is not a JSON object")
    base = 8 + header_len
    body = len(data) - base
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        budget.check()
        if name == "__metadata__":
            continue
        if len(name) > _MAX_TENSOR_NAME_CHARS:
            raise InvalidAdapter(
                f"tensor {show(name)} has a name of {len(name)} characters; "
                f"the limit is {_MAX_TENSOR_NAME_CHARS}"
            )
        if not isinstance(entry, dict):
            raise InvalidAdapter(f"safetensors header entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ALL_SAFETENSORS_DTYPES:
            raise InvalidAdapter(f"tensor {name!r} has unknown dtype {show(dtype)}")
        if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(map(_is_count, shape))):
            raise InvalidAdapter(f"tensor {name!r} has a malformed shape {show(shape)}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]
        ):
            raise InvalidAdapter(f"tensor {name!r} has malformed data_offsets {show(offsets)}")
        if offsets[1] > body:
            raise InvalidAdapter(
                f"safetensors data truncated: tensor {name!r} ends at byte {offsets[1]} "
                f"of a {body}-byte data section"
            )
        want = math.prod(shape) * _ALL_SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != want:
            raise InvalidAdapter(
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype} "
                f"(expected {want})"
            )
        out[name] = TensorInfo(dtype, tuple(shape), base + offsets[0], base + offsets[1])
    return out


def _alpha(value: Any) -> float | None:
    """``value`` as a LoRA alpha: a number within float32's finite range (the scale is applied
    to float32 weights, so a larger one makes them infinite), else None."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return number if abs(number) <= _FLOAT32_MAX else None  # False for NaN


class _PatternTable:
    r"""``rank_pattern`` or ``alpha_pattern`` with PEFT's semantics: the value of the first key
    ``k`` (in order) for which ``re.match(rf"(.*\.)?({k})$", module)`` holds, else the value
    under ``module`` itself, else the default (``get_pattern_key`` then ``dict.get``)."""

    def __init__(self, patterns: dict[str, Any], *, field: str, budget: Budget) -> None:
        self.patterns = patterns
        compiled = compile_pattern_keys(patterns, field=field, budget=budget)
        self.keys = list(zip(compiled, patterns.values(), strict=True))

    def value(self, module: str, default: Any, budget: Budget) -> Any:
        for regex, value in self.keys:
            budget.check()
            if regex.match(module) is not None:
                return value
        return self.patterns.get(module, default)


def _dot_suffixes(module: str) -> list[str]:
    """What follows each dot of ``module``: ``a.b.c`` -> ``["b.c", "c"]``."""
    return [module[i + 1 :] for i, c in enumerate(module) if c == "."]


class _Targets:
    """``target_modules`` with the semantics of PEFT's ``check_target_module_exists``: a string
    is a regex that must ``re.fullmatch`` the module (matched here by RE2); a list holds names
    that must equal the module or one of its dot-separated suffixes."""

    def __init__(self, target: str | list[str]) -> None:
        self.regex = compile_target_modules(target) if isinstance(target, str) else None
        self.names = frozenset() if isinstance(target, str) else frozenset(target)

    def hit(self, module: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(module) is not None
        return module in self.names or any(s in self.names for s in _dot_suffixes(module))


def _parse_config(config_json: bytes) -> dict[str, Any]:
    if len(config_json) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(
            f"adapter_config.json is {len(config_json)} bytes; the limit is {MAX_CONFIG_BYTES}"
        )
    config = decode_json(config_json, what="adapter_config.json")
    if not isinstance(config, dict):
        raise InvalidAdapter("adapter_config.json is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(
            f"adapter_config.json: peft_type is {show(peft_type)}; only LORA is served"
        )
    refusals = {
        "use_dora": "DoRA (use_dora) is not supported",
        "modules_to_save": "modules_to_save is not supported (only LoRA A/B weights are served)",
        "fan_in_fan_out": "fan_in_fan_out is not supported",
        "lora_bias": "lora_bias is not supported",
        "trainable_token_indices": "trainable_token_indices is not supported",
        "layer_replication": "layer_replication is not supported",
        "target_parameters": "target_parameters is not supported",
        "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
        "arrow_config": "arrow routing (arrow_config) is not supported",
        "use_qalora": "QA-LoRA (use_qalora) is not supported",
        "use_bdlora": "use_bdlora is not supported",
        "kasa_config": "kasa_config is not supported",
        "monteclora_config": "monteclora_config is not supported",
    }
    for key, message in refusals.items():
        if config.get(key):
            raise InvalidAdapter(f"adapter_config.json: {message}")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(f"adapter_config.json: bias {show(config['bias'])} is not supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidAdapter(f"adapter_config.json: r must be a positive integer, got {show(r)}")
    alpha = config.get("lora_alpha", 8)
    if _alpha(alpha) is None:
        raise InvalidAdapter(
            f"adapter_config.json: lora_alpha must be a finite number (within float32 range), "
            f"got {show(alpha)}"
        )
    target = config.get("target_modules")
    if not (
        isinstance(target, str)
        or (isinstance(target, list) and target and all(isinstance(t, str) for t in target))
    ):
        raise InvalidAdapter(f"adapter_config.json: bad target_modules {show(target)}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = config.get(key) or {}
        if not isinstance(value, dict):
            raise InvalidAdapter(f"adapter_config.json: {key} must be an object")
    return config


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
    config = _parse_config(config_json)
    target: str | list[str] = config["target_modules"]
    targets = _Targets(target)
    rank_table = _PatternTable(
        config.get("rank_pattern") or {}, field="rank_pattern", budget=budget
    )
    alpha_table = _PatternTable(
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
        known = {s for m in base.modules for s in (m, *_dot_suffixes(m))}
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
        alpha = _alpha(declared_alpha)
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
