"""Tenants and API keys against a real embedded Valkey (see conftest.py for the rules)."""

from __future__ import annotations

import pytest
import redis

from vajra.errors import InvalidRequest, NotFoundError
from vajra.state import ClusterState, TenantRecord, UsageRecord, keys


def test_create_and_look_up(state: ClusterState) -> None:
    record, api_key = state.tenants.create("acme")
    assert record.name == "acme"
    assert record.tenant_id.startswith("t_")
    assert record.created_ms > 0
    assert api_key.startswith("vk_") and len(api_key) > 40
    assert state.tenants.get(record.tenant_id) == record
    assert state.tenants.get_by_name("acme") == record
    assert state.tenants.list() == [record]


def test_unknown_tenant_lookups(state: ClusterState) -> None:
    assert state.tenants.get("t_missing") is None
    assert state.tenants.get_by_name("nobody") is None
    assert state.tenants.list() == []


def test_list_tenants_oldest_first(state: ClusterState) -> None:
    created = [state.tenants.create(f"tenant-{i}")[0] for i in range(5)]
    listed = state.tenants.list()
    assert {t.tenant_id for t in listed} == {t.tenant_id for t in created}
    assert [t.created_ms for t in listed] == sorted(t.created_ms for t in listed)


def test_duplicate_name_rejected(state: ClusterState) -> None:
    first, _ = state.tenants.create("acme")
    with pytest.raises(InvalidRequest) as info:
        state.tenants.create("acme")
    assert info.value.field == "name"
    assert state.tenants.list() == [first]


def test_names_are_case_sensitive(state: ClusterState) -> None:
    a, _ = state.tenants.create("acme")
    b, _ = state.tenants.create("ACME")
    assert a.tenant_id != b.tenant_id


@pytest.mark.parametrize(
    "name",
    ["", "a" * 65, "has space", "slash/", "colon:x", "new\nline", "trailing\n", "ünï", "a*b"],
)
def test_invalid_names_rejected(state: ClusterState, name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        state.tenants.create(name)
    assert info.value.field == "name"
    assert state.tenants.list() == []


@pytest.mark.parametrize("name", ["a", "a" * 64, "A.b-c_9", "..."])
def test_valid_names_accepted(state: ClusterState, name: str) -> None:
    record, _ = state.tenants.create(name)
    assert state.tenants.get_by_name(name) == record


def test_authenticate_good_and_bad_keys(state: ClusterState) -> None:
    record, api_key = state.tenants.create("acme")
    assert state.api_keys.authenticate(api_key) == record
    assert state.api_keys.authenticate(api_key + "x") is None
    assert state.api_keys.authenticate("vk_" + "A" * 43) is None
    assert state.api_keys.authenticate("") is None
    assert state.api_keys.authenticate("not-a-key") is None
    assert state.api_keys.authenticate("vk_" + "x" * 10_000) is None


def test_keys_are_stored_hashed(state: ClusterState, raw: redis.Redis[str]) -> None:
    _, api_key = state.tenants.create("acme")
    secret = api_key.removeprefix("vk_")
    for key in raw.scan_iter("*"):
        assert secret not in key
        if raw.type(key) == "hash":  # type: ignore[no-untyped-call]
            assert all(secret not in v for v in raw.hgetall(key).values())


def test_second_key_and_revocation(state: ClusterState) -> None:
    record, first = state.tenants.create("acme")
    second = state.api_keys.create(record.tenant_id)
    assert second != first
    assert state.api_keys.authenticate(second) == record

    assert state.api_keys.revoke(first) is True
    assert state.api_keys.authenticate(first) is None
    assert state.api_keys.authenticate(second) == record
    assert state.api_keys.revoke(first) is False
    assert state.api_keys.revoke("vk_never-issued") is False


def test_create_api_key_for_unknown_tenant(state: ClusterState, raw: redis.Redis[str]) -> None:
    with pytest.raises(NotFoundError) as info:
        state.api_keys.create("t_missing")
    assert info.value.field == "tenant_id"
    assert raw.dbsize() == 0


def test_deleted_tenant_keys_stop_working(state: ClusterState, raw: redis.Redis[str]) -> None:
    record, first = state.tenants.create("acme")
    second = state.api_keys.create(record.tenant_id)
    other, other_key = state.tenants.create("other")
    state.usage.record(UsageRecord("ev1", record.tenant_id, "r1", "e1", 5.0, 1, 2, 1000))

    purge = state.tenants.delete(record.tenant_id)
    assert purge is not None
    assert (purge.tenant_id, purge.name, purge.api_keys, purge.object_keys) == (
        record.tenant_id,
        "acme",
        2,
        (),
    )
    assert state.api_keys.authenticate(first) is None
    assert state.api_keys.authenticate(second) is None
    assert state.tenants.get(record.tenant_id) is None
    assert state.tenants.get_by_name("acme") is None
    assert state.tenants.list() == [other]
    assert state.api_keys.authenticate(other_key) == other
    assert not raw.exists(keys.tenant_keys(record.tenant_id))
    # its usage totals go with it; the usage stream (the billing history) stays
    assert not raw.exists(keys.usage(record.tenant_id))
    assert raw.xlen(keys.usage_events()) == 1

    assert state.tenants.delete(record.tenant_id) is None
    again, _ = state.tenants.create("acme")  # the name is free again
    assert again.tenant_id != record.tenant_id


def test_orphaned_key_does_not_authenticate(state: ClusterState, raw: redis.Redis[str]) -> None:
    record, api_key = state.tenants.create("acme")
    raw.delete(keys.tenant(record.tenant_id))  # the tenant vanished behind our back
    assert state.api_keys.authenticate(api_key) is None


def test_tenant_record_is_frozen() -> None:
    record = TenantRecord("t_1", "acme", 1)
    with pytest.raises(AttributeError):
        record.name = "other"  # type: ignore[misc]
