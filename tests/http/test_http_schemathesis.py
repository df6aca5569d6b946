"""Schemathesis against the bridge's /openapi.json: no 5xx, and every answer conforms to the
documented status codes, content types and schemas. Bounded: at most 50 generated cases per
operation (derandomized), each call with a timeout.

Test rules: loopback only; a real cluster (the session's) behind the bridge.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.e2e

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_every_operation_conforms_to_the_schema(base_url: str, tenant: tuple[str, str]) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    headers = {"Authorization": f"Bearer {tenant[1]}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    tried: dict[str, int] = {}
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=50,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: schemathesis.Case) -> None:
            tried[case.operation.label] = tried.get(case.operation.label, 0) + 1
            case.call_and_validate(base_url=base_url, headers=headers, timeout=60, checks=CHECKS)

        run()
    assert all(n >= 1 for n in tried.values()) and len(tried) == len(operations), tried
