"""/metrics parses with prometheus_client's parser, and its counters move as requests run.

Test rules: loopback only; every HTTP call has a timeout.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e


def _scrape(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(r.text):
        assert family.name.startswith("vajra_"), family.name
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def _get(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move(base_url: str, tenant: tuple[str, str], model_name: str) -> None:
    h = {"Authorization": f"Bearer {tenant[1]}"}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        before = _scrape(http)
        body = {"model": model_name, "prompt": "metrics", "max_tokens": 4, "temperature": 0}
        assert http.post("/v1/completions", json=body, headers=h).status_code == 200
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=h) as s:
            assert s.status_code == 200
            assert list(s.iter_lines())
        assert (
            http.post("/v1/completions", json={**body, "model": "nope"}, headers=h).status_code
            == 404
        )
        after = _scrape(http)

    route = "/v1/completions"
    ok = {"route": route, "method": "POST", "status": "200"}
    assert (
        _get(after, "vajra_http_requests_total", **ok)
        - _get(before, "vajra_http_requests_total", **ok)
        == 2
    )
    nf = {**ok, "status": "404"}
    assert (
        _get(after, "vajra_http_requests_total", **nf)
        - _get(before, "vajra_http_requests_total", **nf)
        == 1
    )
    for name in ("vajra_generated_tokens_total", "vajra_prompt_tokens_total"):
        assert _get(after, name, target="base") > _get(before, name, target="base"), name
    assert _get(after, "vajra_time_to_first_token_seconds_count", route=route) == (
        _get(before, "vajra_time_to_first_token_seconds_count", route=route) + 1
    )
    e2e = {"route": route, "target": "base"}
    assert _get(after, "vajra_request_end_to_end_seconds_count", **e2e) == (
        _get(before, "vajra_request_end_to_end_seconds_count", **e2e) + 2
    )
    assert (
        _get(after, "vajra_queue_time_seconds_count")
        >= _get(before, "vajra_queue_time_seconds_count") + 2
    )
    assert _get(after, "vajra_billed_gpu_milliseconds_total") > _get(
        before, "vajra_billed_gpu_milliseconds_total"
    )
    assert _get(after, "vajra_gateway_up") == 1.0
    assert ("vajra_executor_queue_depth_requests", (("executor", "exec-0"),)) in after
    assert ("vajra_executor_resident_adapters", (("executor", "exec-0"),)) in after
