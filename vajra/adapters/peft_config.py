"""``adapter_config.json`` as PEFT reads it: the accepted subset, target modules, patterns.

What is accepted is plain LoRA as PEFT saves it: ``peft_type`` LORA, ``bias`` "none", no DoRA,
no ``modules_to_save``, no ``fan_in_fan_out`` (nor any other PEFT extension), a positive ``r``,
a finite ``lora_alpha``. ``target_modules`` and the ``rank_pattern`` / ``alpha_pattern`` keys
are matched with PEFT's exact semantics, by RE2 (see :mod:`vajra.adapters.untrusted`). The
config is size-capped and decoded with bounded depth; any problem is an
:class:`~vajra.adapters.untrusted.InvalidAdapter` naming it.
"""

from __future__ import annotations

from typing import Any

from vajra.adapters.untrusted import (
    MAX_CONFIG_BYTES,
    Budget,
    InvalidAdapter,
    compile_pattern_keys,
    compile_target_modules,
    decode_json,
    show,
)

_FLOAT32_MAX = 3.4028234663852886e38


def alpha_value(value: Any) -> float | None:
    """``value`` as a LoRA alpha: a number within float32's finite range (the scale is applied
    to float32 weights, so a larger one makes them infinite), else None."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return number if abs(number) <= _FLOAT32_MAX else None  # False for NaN


class PatternTable:
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


def dot_suffixes(module: str) -> list[str]:
    """What follows each dot of ``module``: ``a.b.c`` -> ``["b.c", "c"]``."""
    return [module[i + 1 :] for i, c in enumerate(module) if c == "."]


class TargetModules:
    """``target_modules`` with the semantics of PEFT's ``check_target_module_exists``: a string
    is a regex that must ``re.fullmatch`` the module (matched here by RE2); a list holds names
    that must equal the module or one of its dot-separated suffixes."""

    def __init__(self, target: str | list[str]) -> None:
        self.regex = compile_target_modules(target) if isinstance(target, str) else None
        self.names = frozenset() if isinstance(target, str) else frozenset(target)

    def hit(self, module: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(module) is not None
        return module in self.names or any(s in self.names for s in dot_suffixes(module))


def parse_config(config_json: bytes) -> dict[str, Any]:
    """The decoded config, once it is known to be a LoRA config of the subset served."""
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
    if alpha_value(alpha) is None:
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
