"""What a first user meets: `curl -d` bodies, malformed JSON, `/health`, the model list's order.

Test rules: loopback only; port 0 for the bridge started here (in front of a gateway that is
not there: every answer checked here is the bridge's own); everything under `trio.fail_after`.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import trio

from vajra.client import AdapterInfo
from vajra.config import VajraConfig
from vajra.http import HttpBridge
from vajra.http.routes.models import model_cards

KEY = {"Authorization": "Bearer vk_anything"}
JSON_HINT = "the request body must be JSON sent with `Content-Type: application/json`"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def _bridge() -> AsyncIterator[httpx.AsyncClient]:
    """A bridge whose gateway is down, and an HTTP client for it."""
    cfg = (
        VajraConfig()
        .replace("cluster", gateway_address=f"tcp://127.0.0.1:{_free_port()}", model="")
        .replace("http", port=0, health_interval_s=0.1, health_timeout_s=0.3)
    )
    bridge = HttpBridge(cfg)
    async with trio.open_nursery() as nursery:
        address: str = await nursery.start(bridge.run)
        try:
            async with httpx.AsyncClient(base_url=address, timeout=10) as http:
                yield http
        finally:
            await bridge.drain()
            nursery.cancel_scope.cancel()


async def test_a_form_encoded_body_is_told_to_be_json() -> None:
    body = '{"model": "base", "prompt": "hi"}'
    form = {"Content-Type": "application/x-www-form-urlencoded", **KEY}
    with trio.fail_after(30):
        async with _bridge() as http:
            r = await http.post("/v1/completions", content=body, headers=form)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "invalid_request" and err["param"] is None
            assert err["message"] == (
                f"{JSON_HINT}; it was sent as application/x-www-form-urlencoded"
            )
            r = await http.post("/v1/models/base/infer", content=body, headers=form)
            assert r.status_code == 400
            assert r.json()["error"]["message"].startswith(JSON_HINT)
            assert r.json()["error"]["field"] is None
            r = await http.post("/v1/models/base/infer", content=body, headers=KEY)
            assert r.status_code == 400
            assert r.json()["error"]["message"] == f"{JSON_HINT}; it had no Content-Type"
            text = {"Content-Type": "text/plain", **KEY}
            r = await http.post("/v1/chat/completions", content=body, headers=text)
            assert r.status_code == 400
            assert r.json()["error"]["message"] == f"{JSON_HINT}; it was sent as text/plain"
            # A JSON body that is not an object is a JSON problem, not a content-type one.
            r = await http.post("/v1/completions", json=["hi"], headers=KEY)
            assert r.status_code == 400
            assert not r.json()["error"]["message"].startswith(JSON_HINT)


async def test_malformed_json_puts_the_byte_offset_in_the_message_not_in_the_field() -> None:
    as_json = {"Content-Type": "application/json", **KEY}
    with trio.fail_after(30):
        async with _bridge() as http:
            r = await http.post("/v1/models/base/infer", content=b'{"prompt": hi}', headers=as_json)
            assert r.status_code == 400, r.text
            assert r.json()["error"] == {
                "code": "invalid_request",
                "message": "the request body is not valid JSON: Expecting value at byte 11",
                "field": None,
            }
            # "é" is one character and two bytes: the offset counts bytes.
            bad = '{"prompt": "é", "stop": ]}'.encode()
            r = await http.post("/v1/completions", content=bad, headers=as_json)
            assert r.status_code == 400
            err = r.json()["error"]
            assert err["param"] is None
            assert err["message"].endswith(f"at byte {bad.index(b']')}")


async def test_health_is_served_like_healthz_and_documented() -> None:
    with trio.fail_after(30):
        async with _bridge() as http:
            health, healthz = await http.get("/health"), await http.get("/healthz")
            assert health.status_code == healthz.status_code == 200
            assert health.json() == healthz.json() == {"status": "ok", "gateway": "down"}
            paths = (await http.get("/openapi.json")).json()["paths"]
            assert (
                paths["/health"]["get"]["responses"]["200"]
                == (paths["/healthz"]["get"]["responses"]["200"])
            )


def _adapter(name: str, version: int, *, active: bool) -> AdapterInfo:
    return AdapterInfo(
        name, version, "0" * 64, 100, 4, active=active, created_ms=version * 1000 + 999
    )


def test_models_list_each_plain_name_before_its_versions() -> None:
    adapters = [
        _adapter("bot", 1, active=False),
        _adapter("bot", 2, active=True),
        _adapter("bot", 3, active=False),
        _adapter("zed", 1, active=True),
    ]
    cards = model_cards(adapters, "tiny")
    assert [c["id"] for c in cards] == ["tiny", "bot", "bot@1", "bot@2", "bot@3", "zed", "zed@1"]
    by_id = {c["id"]: c for c in cards}
    assert by_id["tiny"]["parent"] is None
    assert all(c["parent"] == "tiny" for i, c in by_id.items() if i != "tiny")
    assert by_id["bot"]["created"] == by_id["bot@2"]["created"] == 2  # the active version's
    assert model_cards([], "tiny") == [by_id["tiny"]]
