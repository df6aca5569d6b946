"""Bodies of the adapter routes, ``/v1/adapters``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
MAX_VERSION = 2**53

_ADAPTER_EXAMPLE: JsonDict = {
    "name": "support-bot",
    "version": 3,
    "ref": "support-bot@3",
    "digest": "9f2c4e…",
    "size_bytes": 1_327_104,
    "rank": 8,
    "lora_alpha": 16.0,
    "target_modules": ["q_proj", "v_proj"],
    "active": True,
    "created_ms": 1_730_000_000_000,
    "parent": "tiny",
}


class AdapterInfoBody(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_ADAPTER_EXAMPLE]})
    name: str
    version: int = Field(description="Versions count up from 1 per name and tenant")
    ref: str = Field(description="NAME@VERSION: what `model`/`adapter_id` names to pin it")
    digest: str = Field(description="sha256 hex over adapter_config.json then the weights")
    size_bytes: int
    rank: int
    lora_alpha: float
    target_modules: list[str]
    active: bool = Field(description="Whether plain NAME resolves to this version")
    created_ms: int = Field(description="Unix time of the upload, milliseconds")
    parent: str = Field(description="The base model it adapts")


class AdapterListBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"object": "list", "data": [_ADAPTER_EXAMPLE]}]}
    )
    object: Literal["list"]
    data: list[AdapterInfoBody]


class AdapterDeleted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"deleted": [_ADAPTER_EXAMPLE]}]})
    deleted: list[AdapterInfoBody] = Field(description="The versions deleted")
