"""Tenant isolation over HTTP: three tenants, every route with another tenant's ids answers
404 exactly like an id that does not exist; a revoked key is refused on its next request.

Test rules: loopback only; every HTTP call has a timeout.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

pytestmark = pytest.mark.e2e


def _shape(r: httpx.Response) -> tuple[int, str, object]:
    err = r.json()["error"]
    return r.status_code, err["code"], err.get("field", err.get("param"))


def test_three_tenants_cannot_see_each_other(
    base_url: str, make_tenant: Callable[[str], tuple[str, str]], model_name: str
) -> None:
    tenants = [make_tenant("iso") for _ in range(3)]
    with httpx.Client(base_url=base_url, timeout=60) as http:
        names = {
            tid: http.get(
                f"/v1/usage/{tid}/metrics", headers={"Authorization": f"Bearer {key}"}
            ).json()["name"]
            for tid, key in tenants
        }
        for tid, key in tenants:
            h = {"Authorization": f"Bearer {key}"}
            assert http.get(f"/v1/usage/{tid}/metrics", headers=h).status_code == 200
            assert http.get(f"/v1/usage/{names[tid]}/metrics", headers=h).status_code == 200
            missing = {
                "usage": http.get("/v1/usage/t_0000000000000000/metrics", headers=h),
                "infer": http.post(
                    f"/v1/models/{model_name}/infer",
                    json={"prompt": "hi", "adapter_id": "nonexistent"},
                    headers=h,
                ),
                "completion": http.post(
                    "/v1/completions",
                    json={"model": "nonexistent", "prompt": "hi", "max_tokens": 2},
                    headers=h,
                ),
                "chat": http.post(
                    "/v1/chat/completions",
                    json={
                        "model": "nonexistent",
                        "messages": [{"role": "user", "content": "hi"}],
                        "stream": True,
                    },
                    headers=h,
                ),
                "model": http.get("/v1/models/nonexistent", headers=h),
            }
            for route, r in missing.items():
                assert r.status_code == 404, (route, r.text)
            for other_id, _ in tenants:
                if other_id == tid:
                    continue
                for other in (other_id, names[other_id]):
                    # Usage of another tenant, by id or by name: the same 404 as a made-up id.
                    r = http.get(f"/v1/usage/{other}/metrics", headers=h)
                    assert _shape(r) == _shape(missing["usage"]), r.text
                    # Another tenant's name used as an adapter / model name: 404 like any unknown.
                    r = http.post(
                        f"/v1/models/{model_name}/infer",
                        json={"prompt": "hi", "adapter_id": other},
                        headers=h,
                    )
                    assert _shape(r) == _shape(missing["infer"]), r.text
                    r = http.post(
                        "/v1/completions",
                        json={"model": other, "prompt": "hi", "max_tokens": 2},
                        headers=h,
                    )
                    assert _shape(r) == _shape(missing["completion"]), r.text
                    r = http.get(f"/v1/models/{other}", headers=h)
                    assert _shape(r) == _shape(missing["model"]), r.text
                # A tenant key is not an admin key.
                r = http.post(f"/v1/admin/tenants/{other_id}/keys", headers=h)
                assert r.status_code == 401, r.text
                r = http.delete(f"/v1/admin/tenants/{other_id}", headers=h)
                assert r.status_code == 401, r.text


def test_a_revoked_key_is_refused_on_its_next_request(
    base_url: str, make_tenant: Callable[[str], tuple[str, str]], admin_key: str, model_name: str
) -> None:
    tid, first_key = make_tenant("rev")
    admin = {"Authorization": f"Bearer {admin_key}"}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        issued = http.post(f"/v1/admin/tenants/{tid}/keys", headers=admin)
        assert issued.status_code == 201, issued.text
        key = issued.json()["api_key"]
        h = {"Authorization": f"Bearer {key}"}
        infer = {"prompt": "hello", "parameters": {"max_tokens": 2}}
        completion = {"model": model_name, "prompt": "hello", "max_tokens": 2}
        # Warm every cache on the way: the bridge's tenant cache and the gateway's auth cache.
        for _ in range(3):
            assert http.post(f"/v1/models/{model_name}/infer", json=infer, headers=h).is_success
            assert http.post("/v1/completions", json=completion, headers=h).is_success
            assert http.get(f"/v1/usage/{tid}/metrics", headers=h).is_success
        r = http.post("/v1/admin/keys/revoke", json={"api_key": key}, headers=admin)
        assert r.status_code == 200, r.text
        # The very next request with it, on every route, is refused.
        assert http.post(f"/v1/models/{model_name}/infer", json=infer, headers=h).status_code == 401
        assert http.post("/v1/completions", json=completion, headers=h).status_code == 401
        assert (
            http.post("/v1/completions", json={**completion, "stream": True}, headers=h).status_code
            == 401
        )
        assert http.get(f"/v1/usage/{tid}/metrics", headers=h).status_code == 401
        assert http.get("/v1/models", headers=h).status_code == 401
        # Revoking it again: it no longer exists.
        r = http.post("/v1/admin/keys/revoke", json={"api_key": key}, headers=admin)
        assert r.status_code == 404
        # The tenant's other key still works.
        h1 = {"Authorization": f"Bearer {first_key}"}
        assert http.post(f"/v1/models/{model_name}/infer", json=infer, headers=h1).is_success
        # Deleting the tenant refuses its remaining key at once.
        assert http.delete(f"/v1/admin/tenants/{tid}", headers=admin).status_code == 200
        assert (
            http.post(f"/v1/models/{model_name}/infer", json=infer, headers=h1).status_code == 401
        )
        # Admin requests with a wrong admin key are refused.
        wrong = {"Authorization": "Bearer not-the-admin-key"}
        assert http.post("/v1/admin/tenants", json={"name": "x"}, headers=wrong).status_code == 401
