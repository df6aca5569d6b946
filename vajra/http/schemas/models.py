"""Bodies of the model routes: OpenAI's ``/v1/models`` and the paper's versions route."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="For an adapter: the base model it adapts")


class ModelList(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "list",
                    "data": [
                        {
                            "id": "tiny",
                            "object": "model",
                            "created": 0,
                            "owned_by": "vajra",
                            "parent": None,
                        }
                    ],
                }
            ]
        }
    )
    object: Literal["list"]
    data: list[ModelCard]


class ModelVersion(BaseModel):
    version: int
    ref: str = Field(description="What to send as `model` / `adapter_id` to use this version")
    active: bool
    digest: str | None = Field(None, description="Adapters only")
    size_bytes: int | None = Field(None, description="Adapters only")
    rank: int | None = Field(None, description="Adapters only")
    created_ms: int | None = Field(None, description="Adapters only")


class ModelVersions(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model_id": "support-bot",
                    "parent": "tiny",
                    "versions": [
                        {
                            "version": 1,
                            "ref": "support-bot@1",
                            "active": False,
                            "digest": "0c1d…",
                            "size_bytes": 1_327_104,
                            "rank": 8,
                            "created_ms": 1_729_000_000_000,
                        },
                        {
                            "version": 2,
                            "ref": "support-bot@2",
                            "active": True,
                            "digest": "9f2c…",
                            "size_bytes": 1_327_104,
                            "rank": 8,
                            "created_ms": 1_730_000_000_000,
                        },
                    ],
                }
            ]
        }
    )
    model_id: str
    parent: str | None = Field(description="The base model, for an adapter; null for the base")
    versions: list[ModelVersion]
