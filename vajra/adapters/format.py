"""PEFT LoRA adapters on disk: parse and validate ``adapter_config.json`` + ``adapter_model.safetensors``.

Pure code: no torch import at module level and no I/O beyond reading a model's ``config.json``.
The safetensors header is parsed here byte by byte (8-byte little-endian header length, then a
JSON header mapping each tensor name to ``{dtype, shape, data_offsets}``), so a pickle file, a
truncated upload or a header whose offsets point past the end is refused before any tensor is
decoded, and nothing outside the checked byte ranges is ever read.

What is accepted is plain LoRA as PEFT saves it for a Llama-family model: ``peft_type`` LORA,
``bias`` "none", no DoRA, no ``modules_to_save``, no ``fan_in_fan_out``, float32/float16/bfloat16
weights, a ``lora_A`` [r, in] and a ``lora_B`` [out, r] for each targeted linear module of the
base. Ranks and alphas may differ per module (``rank_pattern`` / ``alpha_pattern``); the scale is
``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
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

from vajra.errors import InvalidRequest

#: safetensors dtype name -> bytes per element, for the dtypes an adapter may use.
SAFETENSORS_DTYPES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
_ALL_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip
#: The linear layers Vajra's multi-LoRA layer serves on Llama-family models (PEFT's usual targets).
SERVABLE_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$"
)
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


class InvalidAdapter(InvalidRequest):
    """An adapter upload that Vajra refuses; the message names the problem."""

    def __init__(self, message: str, *, field: str | None = "adapter") -> None:
        super().__init__(message, field=field)


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


def adapter_digest(config_json: bytes, weights: bytes) -> str:
    h = hashlib.sha256()
    h.update(config_json)
    h.update(weights)
    return h.hexdigest()


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """``base_model.model.<path>.lora_A[.<adapter>].weight`` -> (path, "A"); None if not LoRA A/B."""
    m = _KEY.match(key)
    if m is None:
        return None
    return m.group("module"), m.group("which")


def read_safetensors_header(data: bytes) -> dict[str, TensorInfo]:
    """Parse and bounds-check a safetensors file's header; raise InvalidAdapter naming the fault."""
    if data[:2] in _PICKLE_MAGIC or data[:4] in _PICKLE_MAGIC:
        raise InvalidAdapter("weights are a pickle/zip file (e.g. .bin or .pt), not safetensors")
    if len(data) < 8:
        raise InvalidAdapter(f"weights are not safetensors: {len(data)} bytes, no header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        raise InvalidAdapter(
            f"weights are not safetensors or truncated: header length {header_len} "
            f"exceeds the {len(data)}-byte file"
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"weights are not safetensors: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise InvalidAdapter("weights are not safetensors: header is not a JSON object")
    base = 8 + header_len
    body = len(data) - base
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise InvalidAdapter(f"safetensors header entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ALL_SAFETENSORS_DTYPES:
            raise InvalidAdapter(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InvalidAdapter(f"tensor {name!r} has a malformed shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            raise InvalidAdapter(f"tensor {name!r} has malformed data_offsets {offsets!r}")
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


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern matching the end of ``module`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targets_module(target_modules: str | list[str], module: str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return module in target_modules or any(module.endswith(f".{t}") for t in target_modules)


def _parse_config(config_json: bytes) -> dict[str, Any]:
    try:
        config = json.loads(config_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"adapter_config.json is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter("adapter_config.json is not a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(
            f"adapter_config.json: peft_type is {peft_type!r}; only LORA is served"
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
        raise InvalidAdapter(f"adapter_config.json: bias {config['bias']!r} is not supported")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise InvalidAdapter(f"adapter_config.json: r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise InvalidAdapter(f"adapter_config.json: lora_alpha must be a number, got {alpha!r}")
    target = config.get("target_modules")
    if not (
        isinstance(target, str)
        or (isinstance(target, list) and target and all(isinstance(t, str) for t in target))
    ):
        raise InvalidAdapter(f"adapter_config.json: bad target_modules {target!r}")
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
) -> AdapterManifest:
    """Check a PEFT LoRA adapter against ``base`` and the limits; return its manifest.

    ``servable``: the short module names an adapter may carry weights for (None: any linear
    module of the base). Raises :class:`InvalidAdapter` (``field="adapter"``) naming the first
    problem found.
    """
    size = len(config_json) + len(weights)
    if size > max_bytes:
        raise InvalidAdapter(f"adapter is {size} bytes; the limit is {max_bytes}")
    config = _parse_config(config_json)
    infos = read_safetensors_header(weights)
    if not infos:
        raise InvalidAdapter("adapter_model.safetensors holds no tensors")

    target: str | list[str] = config["target_modules"]
    if isinstance(target, list):
        missing = [t for t in target if not any(_targets_module([t], m) for m in base.modules)]
        if missing:
            raise InvalidAdapter(
                f"target_modules {missing} name modules the {base.model_type} base model lacks"
            )
    elif not any(_targets_module(target, m) for m in base.modules):
        raise InvalidAdapter(f"target_modules regex {target!r} matches no module of the base model")

    pairs: dict[str, dict[str, str]] = {}
    for key in infos:
        parsed = parse_lora_key(key)
        if parsed is None:
            raise InvalidAdapter(
                f"unsupported tensor {key!r}: only lora_A/lora_B weights are served"
            )
        module, which = parsed
        if module not in base.modules:
            raise InvalidAdapter(f"tensor {key!r} targets {module!r}, which the base model lacks")
        if servable is not None and module.rsplit(".", 1)[-1] not in servable:
            raise InvalidAdapter(
                f"tensor {key!r}: LoRA on {module!r} is not served (only {', '.join(servable)})"
            )
        if which in pairs.setdefault(module, {}):
            raise InvalidAdapter(f"module {module!r} has two lora_{which} tensors")
        pairs[module][which] = key

    rank_pattern: dict[str, Any] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, Any] = config.get("alpha_pattern") or {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dtypes: set[str] = set()
    for module, pair in sorted(pairs.items()):
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
        declared = _pattern_value(rank_pattern, module, config["r"])
        if declared != r:
            raise InvalidAdapter(
                f"module {module!r}: weights have rank {r}, config says {declared}"
            )
        if r > max_rank:
            raise InvalidAdapter(f"module {module!r} has rank {r}; the limit is {max_rank}")
        if not _targets_module(target, module):
            raise InvalidAdapter(f"module {module!r} has weights but is not in target_modules")
        alpha = _pattern_value(alpha_pattern, module, config.get("lora_alpha", 8))
        if not isinstance(alpha, int | float) or isinstance(alpha, bool):
            raise InvalidAdapter(f"module {module!r}: alpha {alpha!r} is not a number")
        ranks[module] = r
        alphas[module] = float(alpha)

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
        digest=adapter_digest(config_json, weights),
        tensors={m: (p["A"], p["B"]) for m, p in sorted(pairs.items())},
    )


def validate_adapter_dir(
    path: Path,
    base: BaseModelSpec,
    *,
    max_rank: int,
    max_bytes: int,
    servable: Collection[str] | None = SERVABLE_MODULES,
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
