"""Every Vajra error code has its own HTTP status; a new code is never a silent 500."""

from __future__ import annotations

from vajra.errors import ErrorCode, QuotaExceeded
from vajra.http._errors import STATUS_BY_CODE, ApiError, error_body


def test_every_error_code_has_a_status() -> None:
    assert {code.value for code in ErrorCode} == set(STATUS_BY_CODE)


def test_a_quota_answers_403_in_both_shapes() -> None:
    err = ApiError.from_vajra(QuotaExceeded("adapter 'x' already holds 2 versions", field="name"))
    assert (err.status, err.code, err.headers) == (403, "quota_exceeded", {})
    assert error_body(err, openai=True)["error"] == {
        "message": "adapter 'x' already holds 2 versions",
        "type": "permission_error",
        "param": "name",
        "code": "quota_exceeded",
    }
    assert error_body(err, openai=False)["error"] == {
        "code": "quota_exceeded",
        "message": "adapter 'x' already holds 2 versions",
        "field": "name",
    }
