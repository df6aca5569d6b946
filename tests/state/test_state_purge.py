"""Deleting a tenant removes everything the state holds for it, and nothing of anyone else's.

Rules: loopback only; the session's real Valkey, FLUSHDB before each test; adapters are
pushed through the registry API; the CLI runs in-process against a local object store.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import redis
import trio

from vajra.cli import main as cli_main
from vajra.state import ClusterState, OffLoop, UsageRecord, keys
from vajra.state.adapters import AdapterRecords
from vajra.storage import LocalObjectStore, adapter_object_keys, put_adapter_objects


def _push(reg: AdapterRecords, tenant_id: str, name: str, seed: str) -> str:
    digest = hashlib.sha256(seed.encode()).hexdigest()
    object_key = f"adapters/{tenant_id}/{digest}"
    reg.register(
        tenant_id,
        name,
        digest=digest,
        object_key=object_key,
        rank=8,
        lora_alpha=16.0,
        target_modules=["q_proj"],
        size_bytes=10,
        base_model="tiny",
    )
    return object_key


def _keys_of(raw: redis.Redis[str], tenant_id: str) -> list[str]:
    """Every key that names the tenant (SCAN over the whole keyspace)."""
    return sorted(k for k in raw.scan_iter(match="*", count=1000) if tenant_id in k)


def _snapshot(raw: redis.Redis[str], tenant_id: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for key in _keys_of(raw, tenant_id):
        kind = raw.type(key)
        if kind == "hash":
            out[key] = raw.hgetall(key)
        elif kind == "set":
            out[key] = sorted(raw.smembers(key))
        elif kind == "zset":
            out[key] = raw.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = raw.get(key)
    return out


def _populate(state: ClusterState, reg: AdapterRecords, name: str) -> tuple[str, list[str]]:
    """A tenant with two API keys, usage, two adapters (three versions, one object shared)."""
    record, _ = state.tenants.create(name)
    t = record.tenant_id
    state.api_keys.create(t)
    state.usage.record(UsageRecord(f"ev-{name}", t, "r1", "e1", 5.0, 1, 2, 1000))
    state.events.record(f"{t}/{'d' * 64}", 1000)  # the predictor's request count
    objects = [
        _push(reg, t, "chat", f"{name}-chat-1"),
        _push(reg, t, "chat", f"{name}-chat-2"),
        _push(reg, t, "code", f"{name}-chat-1"),  # the same bytes as chat@1: one object
    ]
    return t, sorted(set(objects))


@pytest.fixture
def reg(state: ClusterState) -> AdapterRecords:
    return state.adapters


def test_delete_tenant_removes_every_key_of_it_and_none_of_another(
    state: ClusterState, reg: AdapterRecords, raw: redis.Redis[str]
) -> None:
    t, objects = _populate(state, reg, "acme")
    other, _ = _populate(state, reg, "other")
    assert len(objects) == 2
    before_other = _snapshot(raw, other)
    assert any(k.startswith(keys.adapter_tenant_prefix(t)) for k in _keys_of(raw, t))
    assert raw.exists(keys.usage(t))

    purge = state.tenants.delete(t)

    assert purge is not None
    assert (purge.tenant_id, purge.name, purge.api_keys) == (t, "acme", 2)
    assert purge.object_keys == tuple(objects)
    # tenant, name, API keys, usage, every adapter key: gone; a tombstone stays (with a TTL)
    assert _keys_of(raw, t) == [keys.tenant_deleted(t)]
    assert raw.pttl(keys.tenant_deleted(t)) > 0
    assert not raw.sismember(keys.tenants(), t)
    assert raw.get(keys.tenant_name("acme")) is None
    assert _snapshot(raw, other) == before_other
    assert raw.xlen(keys.usage_events()) == 2  # the billing history stays
    assert reg.list(other) and not reg.list(t)
    assert state.tenants.delete(t) is None
    # Usage that was still on its way is kept in the history, but recreates no totals.
    assert state.usage.record(UsageRecord("ev-late", t, "r2", "e1", 5.0, 1, 2, 2000))
    assert not raw.exists(keys.usage(t)) and raw.xlen(keys.usage_events()) == 3
    # Nor does a request count the predictor flushes late.
    state.events.record(f"{t}/{'d' * 64}", 3000)
    assert _keys_of(raw, t) == [keys.tenant_deleted(t)]
    assert state.events.stats(f"{other}/{'d' * 64}").requests == 1
    assert state.usage.record(UsageRecord("ev-other-late", other, "r2", "e1", 5.0, 1, 2, 2000))
    assert state.usage.get(other).requests == 2


def test_delete_tenant_sweeps_keys_a_racing_push_left(
    state: ClusterState, reg: AdapterRecords, raw: redis.Redis[str]
) -> None:
    t, objects = _populate(state, reg, "acme")
    # A version hash the names set does not reach (as if written around the purge).
    stray = keys.adapter_version(t, "ghost", 9)
    raw.hset(stray, mapping={"object_key": f"adapters/{t}/stray", "version": "9"})
    purge = state.tenants.delete(t)
    assert purge is not None
    assert purge.object_keys == tuple(sorted([*objects, f"adapters/{t}/stray"]))
    assert _keys_of(raw, t) == [keys.tenant_deleted(t)]
    # Leftovers alone (the tenant itself already gone) are purged too.
    raw.hset(keys.adapter(t, "late"), mapping={"active": "1"})
    late = state.tenants.delete(t)
    assert late is not None and late.name is None
    assert _keys_of(raw, t) == [keys.tenant_deleted(t)]


async def test_delete_tenant_async(valkey_url: str, raw: redis.Redis[str]) -> None:
    with ClusterState(valkey_url) as sync:
        t, objects = _populate(sync, sync.adapters, "acme")
    state = ClusterState(valkey_url)
    offloop = OffLoop()
    with trio.fail_after(10):
        purge = await offloop.run(state.tenants.delete, t)
        assert purge is not None and purge.object_keys == tuple(objects)
        assert await offloop.run(state.tenants.delete, t) is None
        await offloop.run(state.close)
    assert _keys_of(raw, t) == [keys.tenant_deleted(t)]


def test_cli_tenant_delete_removes_the_adapter_files(
    state: ClusterState,
    reg: AdapterRecords,
    raw: redis.Redis[str],
    valkey_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    objects_dir = tmp_path / "objects"
    store = LocalObjectStore(objects_dir)
    t, objects = _populate(state, reg, "acme")
    _, other_objects = _populate(state, reg, "other")
    for key in [*objects, *other_objects]:
        put_adapter_objects(store, key, b"{}", b"weights")
    store.put(f"adapters/{t}/orphan/adapter_config.json", b"{}")  # an upload never registered

    monkeypatch.setenv("VAJRA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VAJRA_REDIS_URL", valkey_url)
    monkeypatch.setenv("VAJRA_STORAGE_LOCAL_DIR", str(objects_dir))
    assert cli_main(["tenant", "delete", "acme"]) == 0
    assert "tenant acme deleted (5 adapter files removed)" in capsys.readouterr().out

    assert store.list_keys(f"adapters/{t}/") == []
    for key in other_objects:
        assert all(store.exists(k) for k in adapter_object_keys(key))
    assert _keys_of(raw, t) == [keys.tenant_deleted(t)]
    assert cli_main(["tenant", "delete", "acme"]) == 1
    assert "no tenant named 'acme'" in capsys.readouterr().err
