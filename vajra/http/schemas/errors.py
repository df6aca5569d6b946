"""The two error bodies: the bridge's own and OpenAI's (see :mod:`vajra.http._errors`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable error code, e.g. invalid_request, not_found")
    message: str
    field: str | None = Field(None, description="The input to blame, when there is one")


class ErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "code": "invalid_request",
                        "message": "max_tokens must be between 1 and 4096",
                        "field": "max_tokens",
                    }
                }
            ]
        }
    )
    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": {
                        "message": "adapter 'nope' not found",
                        "type": "invalid_request_error",
                        "param": "model",
                        "code": "not_found",
                    }
                }
            ]
        }
    )
    error: OpenAIErrorDetail
