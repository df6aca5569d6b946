"""The hot-swap routes of the bridge: push from memory (JSON, base64 safetensors), one name's
versions with their metadata, rollback; careless and hostile bodies; another tenant's adapter.

Test rules: loopback only; every HTTP call has a timeout; each test uses its own tenants.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.http.conftest import MAX_ADAPTER_BYTES

pytestmark = pytest.mark.e2e

MakeTenant = Callable[[str], tuple[str, str]]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _body(adapter: Path, name: str, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "lora_config": json.loads((adapter / "adapter_config.json").read_text()),
        "safetensors_base64": base64.b64encode(
            (adapter / "adapter_model.safetensors").read_bytes()
        ).decode(),
        **extra,
    }


def test_push_from_memory_versions_and_rollback(
    base_url: str, make_tenant: MakeTenant, adapter_dir: Path
) -> None:
    _, key = make_tenant("swap")
    _, other = make_tenant("swap-other")
    h = _auth(key)
    with httpx.Client(base_url=base_url, timeout=60) as http:
        r = http.post("/v1/adapters/tensors", json=_body(adapter_dir, "bot"), headers=h)
        assert r.status_code == 201, r.text
        assert (r.json()["version"], r.json()["active"]) == (1, True)
        body = _body(
            adapter_dir,
            "bot",
            metrics={"final_loss": 0.5},
            hyperparams={"lr": 0.001},
            dataset_digest="sha256:feed",
        )
        body["lora_config"]["revision"] = "v2"  # type: ignore[index]
        r = http.post("/v1/adapters/tensors", json=body, headers=h)
        assert r.status_code == 201, r.text
        v2 = r.json()
        assert (v2["version"], v2["active"], v2["parent_version"]) == (2, True, 1)
        assert v2["metrics"] == {"final_loss": 0.5} and v2["dataset_digest"] == "sha256:feed"
        staged = http.post(
            "/v1/adapters/tensors", json={**body, "activate": False}, headers=h
        ).json()
        assert (staged["version"], staged["active"], staged["staged"]) == (3, False, True)

        versions = http.get("/v1/adapters/bot/versions", headers=h).json()["data"]
        assert [(v["version"], v["active"], v["staged"]) for v in versions] == [
            (1, False, False),
            (2, True, False),
            (3, False, True),
        ]
        r = http.post("/v1/adapters/bot/rollback", json={"version": 1}, headers=h)
        assert r.status_code == 200, r.text
        assert (r.json()["version"], r.json()["active"]) == (1, True)
        versions = http.get("/v1/adapters/bot/versions", headers=h).json()["data"]
        assert [v["active"] for v in versions] == [True, False, False]

        # Another tenant sees none of it, exactly like a name that does not exist.
        for path, payload in (
            ("/v1/adapters/bot/rollback", {"version": 2}),
            ("/v1/adapters/nobody/rollback", {"version": 1}),
        ):
            r = http.post(path, json=payload, headers=_auth(other))
            assert r.status_code == 404, r.text
        assert http.get("/v1/adapters/bot/versions", headers=_auth(other)).status_code == 404
        assert (
            http.post("/v1/adapters/bot/rollback", json={"version": 9}, headers=h).status_code
            == 404
        )


def test_careless_and_hostile_bodies_are_refused(
    base_url: str, make_tenant: MakeTenant, adapter_dir: Path
) -> None:
    _, key = make_tenant("swap-bad")
    h = _auth(key)
    good = _body(adapter_dir, "bot")
    with httpx.Client(base_url=base_url, timeout=60) as http:
        cases: list[tuple[dict[str, object], int]] = [
            ({**good, "safetensors_base64": "!!not base64!!"}, 400),
            ({**good, "safetensors_base64": base64.b64encode(b"\x00" * 64).decode()}, 400),
            ({**good, "lora_config": {"r": 4}}, 400),  # no target_modules
            ({**good, "name": "../etc"}, 400),
            ({**good, "unexpected": 1}, 400),
            ({**good, "metrics": {"x": "y" * 20_000}}, 400),
            ({**good, "dataset_digest": "spaces are not allowed"}, 400),
            (
                {**good, "safetensors_base64": "A" * ((MAX_ADAPTER_BYTES // 3 + 10) * 4)},
                413,
            ),
        ]
        for payload, status in cases:
            r = http.post("/v1/adapters/tensors", json=payload, headers=h)
            assert r.status_code == status, (r.status_code, r.text[:300])
            assert r.json()["error"]["message"]
        for version in (0, -1, "two", None):
            r = http.post("/v1/adapters/bot/rollback", json={"version": version}, headers=h)
            assert r.status_code == 400, r.text
        # Nothing was stored by any of them.
        assert http.get("/v1/adapters", headers=h).json()["data"] == []
