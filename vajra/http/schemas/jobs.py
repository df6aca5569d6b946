"""Bodies of the training-job routes: ``POST /v1/models/{model_id}/train`` and ``/v1/jobs``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class TrainBody(BaseModel):
    """A fine-tuning job of adapter ``model_id``. Exactly one of ``dataset`` (JSON Lines text),
    ``dataset_base64`` (its bytes, base64) or ``dataset_uri`` (``s3://<the cluster's
    bucket>/datasets/<tenant_id>/...``). The whole body may hold twice
    ``training.max_dataset_bytes`` plus 64 KiB (a dataset as base64, or as JSON text with its
    quotes and newlines escaped); the dataset itself at most ``training.max_dataset_bytes``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "dataset": '{"prompt": "2+2=", "completion": " 4"}\n',
                    "epochs": 3,
                    "learning_rate": 0.001,
                }
            ]
        },
    )
    dataset: str | None = Field(default=None, description="the JSON Lines file's text")
    dataset_base64: str | None = Field(default=None, description="the file's bytes, base64")
    dataset_uri: str | None = Field(default=None, description="s3://bucket/key")
    epochs: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    max_steps: int | None = None
    rank: int | None = Field(default=None, description="fresh adapters only")
    alpha: float | None = Field(default=None, description="fresh adapters only")
    target_modules: list[str] | None = Field(default=None, description="fresh adapters only")
    seed: int | None = None
    params: dict[str, Any] = Field(
        default_factory=dict, description="other training parameters (grad_accum_steps, ...)"
    )
    from_version: int | None = Field(default=None, description="default: the active version")
    fresh: bool = Field(default=False, description="start a new adapter (rank, modules)")


class JobBody(BaseModel):
    """One training job."""

    object: str = "training.job"
    id: str
    adapter: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    base_model: str
    from_version: int | None
    params: dict[str, Any]
    dataset_digest: str
    created_ms: int
    started_ms: int
    finished_ms: int
    step: int
    total_steps: int
    epoch: int
    loss: float
    tokens: int
    gradients: int
    cost_usd: float
    checkpoint_step: int
    result_version: int | None = Field(description="the trained version, once succeeded")
    error: str
    attempt: int
    cancel_requested: bool


class JobListBody(BaseModel):
    object: str = "list"
    data: list[JobBody]
