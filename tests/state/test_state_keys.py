"""The key schema: one prefix, no two builders spelling the same key."""

from __future__ import annotations

from vajra.state import keys


def test_every_key_is_prefixed_and_distinct() -> None:
    built = [
        keys.tenant("t_1"),
        keys.tenant_name("t_1"),
        keys.tenants(),
        keys.api_key("t_1"),
        keys.tenant_keys("t_1"),
        keys.executor("t_1"),
        keys.executors(),
        keys.usage("t_1"),
        keys.usage_events(),
        keys.usage_event("t_1"),
        keys.predictor_adapter("t_1"),
    ]
    assert all(k.startswith(keys.PREFIX) for k in built)
    assert len(set(built)) == len(built)
    assert not any(k.startswith(keys.ADAPTER_PREFIX) for k in built)
    assert keys.PREFIX == "vajra:"


def test_schema_documents_every_builder() -> None:
    doc = keys.__doc__ or ""
    for name in (
        "tenant",
        "tenant_name",
        "tenants",
        "api_key",
        "tenant_keys",
        "executor",
        "executors",
        "usage",
        "usage_events",
        "usage_event",
        "predictor_adapter",
    ):
        assert f":func:`{name}`" in doc
    assert "vajra:adapter:" in doc
