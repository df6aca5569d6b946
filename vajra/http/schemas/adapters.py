"""Bodies of the adapter routes, ``/v1/adapters``."""

from __future__ import annotations

from typing import Any, Literal

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
    "parent_version": 2,
    "dataset_digest": "sha256:5d41…",
    "hyperparams": {"learning_rate": 0.0001, "epochs": 2},
    "metrics": {"final_loss": 0.41},
    "source": "train",
    "staged": False,
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
    parent_version: int | None = Field(
        default=None, description="The version it continues from (active when it was added)"
    )
    dataset_digest: str = Field(default="", description="What it was trained on, if recorded")
    hyperparams: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict, description="e.g. final_loss")
    source: str = Field(default="push", description="push, train or merge")
    staged: bool = Field(default=False, description="Registered, never active yet")


class AdapterListBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"object": "list", "data": [_ADAPTER_EXAMPLE]}]}
    )
    object: Literal["list"]
    data: list[AdapterInfoBody]


class AdapterDeleted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"deleted": [_ADAPTER_EXAMPLE]}]})
    deleted: list[AdapterInfoBody] = Field(description="The versions deleted")


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": 2}]})
    version: int = Field(ge=1, le=MAX_VERSION, description="The version to make active again")


class MergeBody(BaseModel):
    """Two versions of the adapter and the weight of each one's update (see `vajra adapter
    merge`): the merged version holds ``w1*update1 + w2*update2`` exactly, at rank r1 + r2."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"versions": [2, 3], "weights": [0.5, 0.5]}]},
    )
    versions: list[int] = Field(min_length=2, max_length=2, description="the two versions")
    weights: list[float] = Field(
        default=[0.5, 0.5], min_length=2, max_length=2, description="w1, w2 (finite)"
    )
    activate: bool = Field(default=True, description="make it active (else staged)")


class PushTensorsBody(BaseModel):
    """An adapter held in memory: its safetensors bytes (base64) and its PEFT config."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "support-bot",
                    "lora_config": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]},
                    "safetensors_base64": "…",
                    "metrics": {"final_loss": 0.41},
                }
            ]
        },
    )
    name: str = Field(min_length=1, max_length=64, pattern=ADAPTER_NAME_PATTERN)
    lora_config: dict[str, Any] = Field(description="adapter_config.json as an object")
    safetensors_base64: str = Field(description="adapter_model.safetensors, base64")
    metrics: dict[str, Any] = Field(default_factory=dict)
    hyperparams: dict[str, Any] = Field(default_factory=dict)
    dataset_digest: str = Field(default="", max_length=128)
    activate: bool = Field(default=True, description="False: stage it (NAME@VERSION only)")
