"""Adapters over HTTP: upload (two files, .tar.gz, .zip), list, versions, delete; the official
`openai` package against an uploaded adapter; refusals naming the problem; and isolation between
three tenants on every adapter route.

Test rules: loopback only; every HTTP call has a timeout; each test uses its own tenants, so
nothing here depends on what another test pushed.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import redis

from tests.e2e.harness import RunningCluster
from tests.http.conftest import MAX_ADAPTER_BYTES

pytestmark = pytest.mark.e2e

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MakeTenant = Callable[[str], tuple[str, str]]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _files(adapter: Path) -> dict[str, tuple[str, bytes]]:
    return {n: (n, (adapter / n).read_bytes()) for n in (CONFIG, WEIGHTS)}


def _targz(adapter: Path) -> bytes:
    """What `tar czf a.tgz tiny-lora/` gives: one folder, README.md included."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(adapter, arcname=adapter.name)
    return buf.getvalue()


def _zip(adapter: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for f in adapter.iterdir():
            z.write(f, arcname=f.name)
    return buf.getvalue()


def _push(
    http: httpx.Client, key: str, name: str, files: dict[str, tuple[str, bytes]]
) -> httpx.Response:
    return http.post("/v1/adapters", data={"name": name}, files=files, headers=_auth(key))


def test_push_list_versions_and_delete(
    base_url: str, make_tenant: MakeTenant, adapter_dir: Path, model_name: str
) -> None:
    _, key = make_tenant("ad")
    h = _auth(key)
    with httpx.Client(base_url=base_url, timeout=60) as http:
        r = _push(http, key, "bot", _files(adapter_dir))
        assert r.status_code == 201, r.text
        v1 = r.json()
        assert (v1["name"], v1["version"], v1["ref"], v1["parent"]) == (
            "bot",
            1,
            "bot@1",
            model_name,
        )
        assert v1["rank"] == 4 and v1["active"] and len(v1["digest"]) == 64
        assert v1["size_bytes"] == sum(len(b) for _, b in _files(adapter_dir).values())
        assert sorted(v1["target_modules"]) == ["q_proj", "v_proj"]
        r = _push(http, key, "bot", {"archive": ("a.tar.gz", _targz(adapter_dir))})
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 2 and r.json()["digest"] == v1["digest"]
        r = _push(http, key, "bot", {"archive": ("a.zip", _zip(adapter_dir))})
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 3

        listed = http.get("/v1/adapters", headers=h).json()
        assert listed["object"] == "list"
        assert [(a["ref"], a["active"]) for a in listed["data"]] == [
            ("bot@1", False),
            ("bot@2", False),
            ("bot@3", True),
        ]
        versions = http.get("/v1/models/bot/versions", headers=h).json()
        assert versions["model_id"] == "bot" and versions["parent"] == model_name
        assert [(v["version"], v["active"]) for v in versions["versions"]] == [
            (1, False),
            (2, False),
            (3, True),
        ]
        one = http.get("/v1/models/bot@2/versions", headers=h).json()
        assert [v["ref"] for v in one["versions"]] == ["bot@2"]
        base = http.get(f"/v1/models/{model_name}/versions", headers=h).json()
        assert base == {
            "model_id": model_name,
            "parent": None,
            "versions": [
                {
                    "version": 1,
                    "ref": model_name,
                    "active": True,
                    "digest": None,
                    "size_bytes": None,
                    "rank": None,
                    "created_ms": None,
                }
            ],
        }
        listed_models = http.get("/v1/models", headers=h).json()["data"]
        assert [m["id"] for m in listed_models] == [model_name, "bot", "bot@1", "bot@2", "bot@3"]
        models = {m["id"]: m for m in listed_models}
        assert set(models) == {model_name, "bot", "bot@1", "bot@2", "bot@3"}
        assert models[model_name]["parent"] is None
        assert all(m["parent"] == model_name for i, m in models.items() if i != model_name)
        assert http.get("/v1/models/bot@2", headers=h).json()["id"] == "bot@2"

        r = http.delete("/v1/adapters/bot@3", headers=h)
        assert r.status_code == 200, r.text
        assert [a["ref"] for a in r.json()["deleted"]] == ["bot@3"]
        r = http.delete("/v1/adapters/bot", params={"version": 1}, headers=h)
        assert [a["ref"] for a in r.json()["deleted"]] == ["bot@1"]
        left = http.get("/v1/models/bot/versions", headers=h).json()["versions"]
        assert [(v["version"], v["active"]) for v in left] == [(2, True)]
        r = http.delete("/v1/adapters/bot", headers=h)
        assert [a["ref"] for a in r.json()["deleted"]] == ["bot@2"]
        assert http.get("/v1/models/bot/versions", headers=h).status_code == 404
        assert http.delete("/v1/adapters/bot", headers=h).status_code == 404
        assert http.get("/v1/adapters", headers=h).json()["data"] == []
        r = http.delete("/v1/adapters/bot@2", params={"version": 3}, headers=h)
        assert r.status_code == 400 and r.json()["error"]["field"] == "name"


def test_merge_route(base_url: str, make_tenant: MakeTenant, adapter_dir: Path) -> None:
    _, key = make_tenant("merger")
    _, other = make_tenant("merger-other")
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for _ in range(2):
            assert _push(http, key, "mix", _files(adapter_dir)).status_code == 201
        body = {"versions": [1, 2], "weights": [0.5, 0.5]}
        r = http.post("/v1/adapters/mix/merge", json=body, headers=_auth(key))
        assert r.status_code == 201, r.text
        merged = r.json()
        assert (merged["version"], merged["rank"], merged["active"]) == (3, 8, True)
        assert merged["source"] == "merge"
        r = http.post("/v1/adapters/mix/merge", json=body, headers=_auth(other))
        assert r.status_code == 404, r.text  # another tenant's adapter: not found
        for bad in ({"versions": [1]}, {"versions": [1, 2], "weights": [0, 0]}, {"x": 1}):
            r = http.post("/v1/adapters/mix/merge", json=bad, headers=_auth(key))
            assert r.status_code == 400, (bad, r.text)
        r = http.post(
            "/v1/adapters/mix/merge", json={**body, "activate": False}, headers=_auth(key)
        )
        assert r.status_code == 201 and not r.json()["active"], r.text


def test_openai_package_against_an_uploaded_adapter(
    base_url: str, make_tenant: MakeTenant, adapter_dir: Path, model_name: str
) -> None:
    _, key = make_tenant("oa")
    with httpx.Client(base_url=base_url, timeout=60) as http:
        assert _push(http, key, "lora", _files(adapter_dir)).status_code == 201
    oai = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, timeout=60, max_retries=0)
    prompt = "Once upon a time"
    texts: dict[str, str] = {}
    for model in ("lora", "lora@1", model_name):
        done = oai.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        assert done.model == model and done.usage is not None
        streamed = oai.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
        texts[model] = done.choices[0].text
    assert texts["lora"] == texts["lora@1"]
    assert texts["lora"] != texts[model_name], "the adapter must change the output"

    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Tell me about the river town."}
    ]
    chat = oai.chat.completions.create(model="lora", messages=messages, max_tokens=8, temperature=0)
    assert chat.model == "lora" and chat.choices[0].message.role == "assistant"
    stream = oai.chat.completions.create(
        model="lora@1", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == chat.choices[0].message.content
    assert any(m.id == "lora" and m.parent == model_name for m in oai.models.list())  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="lora@2", prompt=prompt, max_tokens=2)


def test_bad_uploads_are_refused_naming_the_problem(
    base_url: str, make_tenant: MakeTenant, adapter_dir: Path
) -> None:
    _, key = make_tenant("bad")
    good = _files(adapter_dir)
    config, weights = good[CONFIG][1], good[WEIGHTS][1]

    def refused(files: dict[str, tuple[str, bytes]], name: str = "x") -> dict[str, str]:
        r = _push(http, key, name, files)
        assert r.status_code == 400, r.text
        return r.json()["error"]  # type: ignore[no-any-return]

    with httpx.Client(base_url=base_url, timeout=60) as http:
        pickled = pickle.dumps({"base_model.model.q_proj.lora_A.weight": [1.0, 2.0]})
        err = refused({**good, WEIGHTS: (WEIGHTS, pickled)})
        assert "pickle" in err["message"], err
        err = refused({**good, WEIGHTS: (WEIGHTS, b"PK\x03\x04" + b"\0" * 60)})  # torch.save zip
        assert "pickle" in err["message"], err
        err = refused({**good, WEIGHTS: (WEIGHTS, weights[: len(weights) // 2])})
        assert "safetensors" in err["message"] or "truncated" in err["message"], err
        err = refused({**good, CONFIG: (CONFIG, b"{not json")})
        assert "adapter_config.json" in err["message"], err
        cfg = json.loads(config)
        err = refused({**good, CONFIG: (CONFIG, json.dumps({**cfg, "r": 0}).encode())})
        assert "r must be a positive integer" in err["message"], err
        err = refused({CONFIG: good[CONFIG], "adapter_model.bin": ("adapter_model.bin", pickled)})
        assert err["field"] == "adapter_model.bin" and "pickle" in err["message"]
        err = refused({CONFIG: good[CONFIG]})
        assert err["field"] == WEIGHTS and "missing" in err["message"]
        err = refused({**good, "archive": ("a.zip", _zip(adapter_dir))})
        assert err["field"] == "archive"
        err = refused({**good, "extra.py": ("extra.py", b"import os")})
        assert err["field"] == "extra.py"
        err = refused(good, name="../etc")
        assert err["field"] == "name"
        err = refused({"archive": ("a.tgz", b"not an archive")})
        assert err["field"] == "archive"
        evil = io.BytesIO()
        with tarfile.open(fileobj=evil, mode="w:gz") as tar:
            info = tarfile.TarInfo("../adapter_config.json")
            info.size = len(config)
            tar.addfile(info, io.BytesIO(config))
        err = refused({"archive": ("evil.tgz", evil.getvalue())})
        assert "outside the archive" in err["message"], err
        link = io.BytesIO()
        with tarfile.open(fileobj=link, mode="w:gz") as tar:
            tar.addfile(tarfile.TarInfo(CONFIG), io.BytesIO(b""))
            sym = tarfile.TarInfo(WEIGHTS)
            sym.type, sym.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(sym)
        err = refused({"archive": ("link.tgz", link.getvalue())})
        assert "link" in err["message"], err

        # Over adapters.max_adapter_bytes: 413, whether sent as files or inside an archive.
        huge = weights + b"\0" * MAX_ADAPTER_BYTES
        r = _push(http, key, "x", {**good, WEIGHTS: (WEIGHTS, huge)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
        bomb = io.BytesIO()
        with tarfile.open(fileobj=bomb, mode="w:gz") as tar:
            info = tarfile.TarInfo(WEIGHTS)
            info.size = 4 * MAX_ADAPTER_BYTES
            tar.addfile(info, io.BytesIO(b"\0" * info.size))
        assert len(bomb.getvalue()) < 65536
        r = _push(http, key, "x", {"archive": ("bomb.tgz", bomb.getvalue())})
        assert r.status_code == 413, r.text
        # Nothing refused was stored.
        assert http.get("/v1/adapters", headers=_auth(key)).json()["data"] == []


def _body_without(r: httpx.Response, name: str) -> tuple[int, str]:
    return r.status_code, r.text.replace(name, "NAME")


def test_three_tenants_cannot_touch_each_others_adapters(
    base_url: str, make_tenant: MakeTenant, adapter_dir: Path, model_name: str
) -> None:
    tenants = [make_tenant("adiso") for _ in range(3)]
    own = {key: f"mine-{i}" for i, (_, key) in enumerate(tenants)}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for _, key in tenants:
            assert _push(http, key, own[key], _files(adapter_dir)).status_code == 201
            assert _push(http, key, "shared", _files(adapter_dir)).status_code == 201

        def attempts(key: str, name: str) -> dict[str, httpx.Response]:
            h = _auth(key)
            chat = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
            return {
                "versions": http.get(f"/v1/models/{name}/versions", headers=h),
                "versions@1": http.get(f"/v1/models/{name}@1/versions", headers=h),
                "model": http.get(f"/v1/models/{name}", headers=h),
                "model@1": http.get(f"/v1/models/{name}@1", headers=h),
                "delete": http.delete(f"/v1/adapters/{name}", headers=h),
                "delete@1": http.delete(f"/v1/adapters/{name}@1", headers=h),
                "delete?version": http.delete(
                    f"/v1/adapters/{name}", params={"version": 1}, headers=h
                ),
                "infer": http.post(
                    f"/v1/models/{model_name}/infer",
                    json={"prompt": "hi", "adapter_id": name, "parameters": {"max_tokens": 2}},
                    headers=h,
                ),
                "completion": http.post(
                    "/v1/completions",
                    json={"model": f"{name}@1", "prompt": "hi", "max_tokens": 2},
                    headers=h,
                ),
                "chat-stream": http.post(
                    "/v1/chat/completions", json={**chat, "stream": True}, headers=h
                ),
            }

        for _, key in tenants:
            missing = {
                route: _body_without(r, "no-such-adapter")
                for route, r in attempts(key, "no-such-adapter").items()
            }
            assert all(status == 404 for status, _ in missing.values()), missing
            for _, other_key in tenants:
                if other_key == key:
                    continue
                name = own[other_key]
                for route, r in attempts(key, name).items():
                    assert _body_without(r, name) == missing[route], (route, r.text)
            h = _auth(key)
            listed = [a["ref"] for a in http.get("/v1/adapters", headers=h).json()["data"]]
            assert listed == sorted([f"{own[key]}@1", "shared@1"])
            ids = {m["id"] for m in http.get("/v1/models", headers=h).json()["data"]}
            assert ids == {model_name, own[key], f"{own[key]}@1", "shared", "shared@1"}
        # Nobody's deletes reached another tenant: every adapter is still there and usable.
        for _, key in tenants:
            for name in (own[key], "shared"):
                r = http.get(f"/v1/models/{name}/versions", headers=_auth(key))
                assert r.status_code == 200 and len(r.json()["versions"]) == 1, r.text
            r = http.post(
                "/v1/completions",
                json={"model": own[key], "prompt": "hi", "max_tokens": 2},
                headers=_auth(key),
            )
            assert r.status_code == 200, r.text
        # The adapter routes are counted in /metrics like every other.
        metrics = http.get("/metrics").text
        assert 'vajra_http_requests_total{method="POST",route="/v1/adapters",status="201"}' in (
            metrics
        )


def test_deleting_a_tenant_removes_its_keys_usage_adapters_and_files(
    http_cluster: RunningCluster,
    base_url: str,
    make_tenant: MakeTenant,
    admin_key: str,
    adapter_dir: Path,
) -> None:
    """An admin delete leaves nothing of the tenant in Redis or in the object store (its files
    go once its requests in flight have ended); another tenant is untouched."""
    gone_id, gone_key = make_tenant("gone")
    kept_id, kept_key = make_tenant("kept")
    objects = http_cluster.home / "objects" / "adapters"
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for key in (gone_key, kept_key):
            assert _push(http, key, "bot", _files(adapter_dir)).status_code == 201
            r = http.post(
                "/v1/completions",
                json={"model": "bot", "prompt": "hi", "max_tokens": 2},
                headers=_auth(key),
            )
            assert r.status_code == 200, r.text
        assert (objects / gone_id).is_dir() and (objects / kept_id).is_dir()
        # Training files, as the gateway and an executor store them: they go with the tenant.
        root = http_cluster.home / "objects"
        for tid in (gone_id, kept_id):
            for rel in (f"datasets/{tid}/{'a' * 64}.jsonl", f"checkpoints/{tid}/j1/3.safetensors"):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(b"x")
        gone_dirs = [objects / gone_id, root / "datasets" / gone_id, root / "checkpoints" / gone_id]
        r = http.delete(f"/v1/admin/tenants/{gone_id}", headers=_auth(admin_key))
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 20
        while any(d.exists() and any(d.rglob("*.*")) for d in gone_dirs):
            assert time.monotonic() < deadline, [list(d.rglob("*")) for d in gone_dirs]
            time.sleep(0.1)
        assert (root / "datasets" / kept_id).is_dir() and (root / "checkpoints" / kept_id).is_dir()
        client: redis.Redis[str] = redis.Redis.from_url(
            http_cluster.redis_url, decode_responses=True
        )
        try:
            left = [k for k in client.scan_iter("vajra:*") if gone_id in k]
            kept = [k for k in client.scan_iter("vajra:*") if kept_id in k]
        finally:
            client.close()
        assert left == [f"vajra:tenant-deleted:{gone_id}"]  # keeps late usage from counting
        assert any(k.startswith("vajra:adapter:") for k in kept)
        assert http.get("/v1/adapters", headers=_auth(gone_key)).status_code == 401
        r = http.post(
            "/v1/completions",
            json={"model": "bot", "prompt": "hi", "max_tokens": 2},
            headers=_auth(kept_key),
        )
        assert r.status_code == 200, r.text
