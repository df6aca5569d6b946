"""Tenants' LoRA adapters: the PEFT on-disk format, validation and manifests."""

from vajra.adapters.format import (
    SERVABLE_MODULES,
    AdapterManifest,
    BaseModelSpec,
    InvalidAdapter,
    adapter_digest,
    base_model_spec,
    parse_lora_key,
    validate_adapter,
    validate_adapter_dir,
)
from vajra.adapters.safetensors_header import read_safetensors_header

__all__ = [
    "SERVABLE_MODULES",
    "AdapterManifest",
    "BaseModelSpec",
    "InvalidAdapter",
    "adapter_digest",
    "base_model_spec",
    "parse_lora_key",
    "read_safetensors_header",
    "validate_adapter",
    "validate_adapter_dir",
]
