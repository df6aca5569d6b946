"""The body of the liveness routes, ``/healthz`` and ``/health``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok", "gateway": "up"}]})
    status: str
    gateway: Literal["up", "down"]
