"""Bodies of the administration routes, ``/v1/admin/…`` (admin key)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TenantCreate(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "acme"}]})
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class KeyRevoke(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"api_key": "vk_…"}]})
    api_key: str = Field(min_length=1, max_length=256)


class IssuedKeyBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"tenant_id": "t_0123456789abcdef", "name": "acme", "api_key": "vk_…"}]
        }
    )
    tenant_id: str
    name: str
    api_key: str = Field(description="Shown only in this answer")


class Done(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"ok": True}]})
    ok: bool
