"""The body of the paper's usage route, ``GET /v1/usage/{tenant_id}/metrics``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class UsageMetrics(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant_id": "t_0123456789abcdef",
                    "name": "acme",
                    "requests": 12,
                    "gpu_ms": 830.0,
                    "prompt_tokens": 120,
                    "completion_tokens": 384,
                    "total_tokens": 504,
                    "cost_usd": 0.0000138,
                }
            ]
        }
    )
    tenant_id: str
    name: str
    requests: int
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float = Field(
        description="gpu_ms x gpu_price_per_hour / 3,600,000 x tenancy_factor (paper A.2)"
    )
