"""The body of the paper's usage route, ``GET /v1/usage/{tenant_id}/metrics``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class UsageLine(BaseModel):
    """One invoice line: the usage buckets sharing ``label`` (see ``group_by``), priced."""

    label: str = Field(description="adapter@version, (base), a kind, a UTC day, or total")
    events: int
    gpu_ms: float = Field(description="measured GPU time")
    billed_ms: int = Field(description="inference GPU time, rounded up per request")
    prompt_tokens: int
    completion_tokens: int
    gradients: int = Field(description="trainable parameters x optimizer steps")
    inference_cost_usd: float = Field(
        description="billed_ms x gpu_price_per_hour / 3,600,000 x tenancy_factor (paper A.2)"
    )
    training_cost_usd: float = Field(
        description="gradients x price_per_million_gradients / 1,000,000 x gpu_price_per_hour"
    )
    cost_usd: float


class UsageMetrics(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant_id": "t_0123456789abcdef",
                    "name": "acme",
                    "requests": 12,
                    "gpu_ms": 830.0,
                    "billed_ms": 900,
                    "gradients": 0,
                    "prompt_tokens": 120,
                    "completion_tokens": 384,
                    "total_tokens": 504,
                    "cost_usd": 0.00015,
                    "group_by": "kind",
                    "start_unix_ms": None,
                    "end_unix_ms": None,
                    "lines": [],
                    "total": None,
                }
            ]
        }
    )
    tenant_id: str
    name: str
    requests: int = Field(description="usage events recorded, all time")
    gpu_ms: float
    billed_ms: int
    gradients: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float = Field(description="all-time cost (inference + training, paper A.2)")
    group_by: str | None
    start_unix_ms: int | None
    end_unix_ms: int | None
    lines: list[UsageLine] = Field(description="the UTC days in [start, end), grouped, priced")
    total: UsageLine | None = Field(description="the lines together")
