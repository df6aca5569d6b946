"""The adapter registry's records on a real Valkey: versions, the active pointer, NAME@VERSION,
delete, reference-counted objects, and isolation between tenants.

Rules: loopback only; every test starts from an empty database (FLUSHDB); async tests run
under ``trio.fail_after``; Hypothesis checks the registry against a plain-Python model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
import redis
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vajra.adapters.versions import parse_adapter_ref
from vajra.errors import InvalidRequest, NotFoundError, QuotaExceeded, UnavailableError
from vajra.state import ClusterState, OffLoop, keys
from vajra.state.adapters import AdapterRecords


def _digest(seed: str) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()


@pytest.fixture
def reg(valkey_url: str, raw: redis.Redis[str]) -> Iterator[AdapterRecords]:
    with ClusterState(valkey_url) as state:
        yield state.adapters


def _push(
    reg: AdapterRecords, tenant: str, name: str, seed: str, rank: int = 8, **limits: int
) -> int:
    d = _digest(seed)
    return reg.register(
        tenant,
        name,
        digest=d,
        object_key=f"adapters/{tenant}/{d}",
        rank=rank,
        lora_alpha=16.0,
        target_modules=["q_proj", "v_proj"],
        size_bytes=1234,
        base_model="tiny-llama",
        **limits,
    ).version


def test_versions_active_pointer_and_refs(reg: AdapterRecords) -> None:
    assert _push(reg, "t_a", "chat", "one") == 1
    assert _push(reg, "t_a", "chat", "two", rank=16) == 2
    r = reg.resolve("t_a", "chat")
    assert (r.name, r.version, r.digest, r.rank, r.size_bytes) == (
        "chat",
        2,
        _digest("two"),
        16,
        1234,
    )
    assert r.object_key == f"adapters/t_a/{_digest('two')}"
    assert reg.resolve("t_a", "chat@1").digest == _digest("one")
    v1 = reg.get("t_a", "chat", 1)
    assert not v1.active and v1.target_modules == ("q_proj", "v_proj") and v1.lora_alpha == 16.0
    assert reg.get("t_a", "chat").active
    listed = reg.list("t_a")
    assert [(a.name, a.version, a.active) for a in listed] == [
        ("chat", 1, False),
        ("chat", 2, True),
    ]

    # Deleting the active version falls back to the newest remaining one.
    gone = reg.delete("t_a", "chat", 2)
    assert [v.version for v in gone.versions] == [2]
    assert gone.freed_object_keys == (f"adapters/t_a/{_digest('two')}",)
    assert reg.resolve("t_a", "chat").version == 1
    # Numbers are never reused while the name exists.
    assert _push(reg, "t_a", "chat", "three") == 3
    with pytest.raises(NotFoundError):
        reg.resolve("t_a", "chat@2")

    # The same bytes under another name share the object: freed only with the last user.
    _push(reg, "t_a", "copy", "one")
    gone = reg.delete("t_a", "chat")
    assert sorted(v.version for v in gone.versions) == [1, 3]
    assert gone.freed_object_keys == (f"adapters/t_a/{_digest('three')}",)
    gone = reg.delete("t_a", "copy")
    assert gone.freed_object_keys == (f"adapters/t_a/{_digest('one')}",)
    assert reg.list("t_a") == []
    # A deleted name starts again at version 1.
    assert _push(reg, "t_a", "chat", "four") == 1


def test_quotas_on_names_and_versions(reg: AdapterRecords, raw: redis.Redis[str]) -> None:
    limits = {"max_names": 2, "max_versions": 3}
    assert _push(reg, "t_q", "a", "a1", **limits) == 1
    assert _push(reg, "t_q", "b", "b1", **limits) == 1
    before = sorted(raw.keys("*"))
    reg.check_quota("t_q", "b", 2, 3)  # an existing name may grow
    for check in (
        lambda: reg.check_quota("t_q", "c", 2, 3),
        lambda: _push(reg, "t_q", "c", "c1", **limits),
    ):
        with pytest.raises(QuotaExceeded, match="already holds 2 adapters") as e:
            check()
        assert e.value.field == "name" and not e.value.retriable
    assert sorted(raw.keys("*")) == before  # refused: nothing written
    _push(reg, "t_q", "b", "b2", **limits)
    _push(reg, "t_q", "b", "b3", **limits)
    with pytest.raises(QuotaExceeded, match="already holds 3 versions"):
        _push(reg, "t_q", "b", "b4", **limits)
    assert _push(reg, "t_q2", "c", "c1", **limits) == 1  # another tenant has its own quota
    # Deleting makes room again; 0 means no limit.
    reg.delete("t_q", "b", 1)
    assert _push(reg, "t_q", "b", "b4", **limits) == 4
    reg.delete("t_q", "a")
    assert _push(reg, "t_q", "c", "c1", **limits) == 1
    for i in range(5):
        _push(reg, "t_q3", f"n{i}", f"s{i}")


def test_concurrent_registrations_never_pass_a_quota(valkey_url: str) -> None:
    """The limit is checked in the registering script itself: racing pushes cannot pass it."""
    import threading

    outcomes: list[str] = []
    lock = threading.Lock()

    def push(i: int) -> None:
        with ClusterState(valkey_url) as state:
            try:
                _push(state.adapters, "t_race", f"n{i}", f"s{i}", max_names=5)
                result = "ok"
            except QuotaExceeded:
                result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == ["ok"] * 5 + ["refused"] * 11


def test_nothing_is_left_after_deleting_everything(
    reg: AdapterRecords, raw: redis.Redis[str]
) -> None:
    _push(reg, "t_a", "x", "1")
    _push(reg, "t_a", "x", "2")
    _push(reg, "t_a", "y", "2")
    reg.delete("t_a", "x", 1)
    reg.delete("t_a", "x")
    reg.delete("t_a", "y", 1)
    assert raw.keys("*") == []


def test_unknown_and_malformed_references(reg: AdapterRecords) -> None:
    _push(reg, "t_a", "chat", "one")
    for ref in ("nope", "chat@2", "nope@1"):
        with pytest.raises(NotFoundError) as nf:
            reg.resolve("t_a", ref)
        assert nf.value.field == "adapter" and nf.value.message == f"adapter {ref!r} not found"
    for ref in ("", "a b", "chat@", "chat@0", "chat@x", "chat@-1", "chat@1@2", "x" * 65, "ch:at"):
        with pytest.raises(InvalidRequest) as bad:
            reg.resolve("t_a", ref)
        assert bad.value.field == "adapter"
    assert parse_adapter_ref("a.b-c_D@12") == ("a.b-c_D", 12)
    with pytest.raises(InvalidRequest):
        _push(reg, "t_a", "bad name", "x")
    with pytest.raises(InvalidRequest):
        _push(reg, "t:a", "chat", "x")
    with pytest.raises(NotFoundError):
        reg.delete("t_a", "chat", 9)
    with pytest.raises(NotFoundError):
        reg.delete("t_a", "other")


def test_tenants_are_isolated(reg: AdapterRecords) -> None:
    """Tenant B and C see A's adapter exactly as they see a name nobody has."""
    _push(reg, "t_a", "secret", "a1")
    _push(reg, "t_b", "shared-name", "b1")
    _push(reg, "t_c", "shared-name", "c1")
    _push(reg, "t_c", "shared-name", "c2")
    for other in ("t_b", "t_c"):
        for ref in ("secret", "secret@1"):
            with pytest.raises(NotFoundError) as theirs:
                reg.resolve(other, ref)
            with pytest.raises(NotFoundError) as nobodys:
                reg.resolve(other, ref.replace("secret", "zzzzzz"))
            assert theirs.value.message == nobodys.value.message.replace("zzzzzz", "secret")
            assert theirs.value.field == nobodys.value.field
        with pytest.raises(NotFoundError):
            reg.delete(other, "secret")
        assert all(a.name != "secret" for a in reg.list(other))
    # The same name is independent per tenant.
    assert reg.resolve("t_b", "shared-name").digest == _digest("b1")
    assert reg.resolve("t_c", "shared-name").digest == _digest("c2")
    assert reg.resolve("t_b", "shared-name").version == 1
    reg.delete("t_c", "shared-name")
    assert reg.resolve("t_b", "shared-name").version == 1
    assert reg.resolve("t_a", "secret").version == 1


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["push", "delete-version", "delete-name"]),
        st.sampled_from(["t_a", "t_b", "t_c"]),
        st.sampled_from(["n1", "n2"]),
        st.integers(1, 4),  # content seed for pushes, version for deletes
    ),
    max_size=20,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS)
def test_registry_matches_a_model(
    reg: AdapterRecords, raw: redis.Redis[str], ops: list[tuple[str, str, str, int]]
) -> None:
    raw.flushdb()
    # model: (tenant, name) -> {"last": int, "versions": {v: seed}, "active": v}
    model: dict[tuple[str, str], dict[str, object]] = {}
    for op, tenant, name, n in ops:
        entry = model.get((tenant, name))
        if op == "push":
            version = _push(reg, tenant, name, f"s{n}")
            if entry is None:
                entry = model[(tenant, name)] = {"last": 0, "versions": {}}
            assert version == int(entry["last"]) + 1  # type: ignore[call-overload]
            entry["last"] = version
            entry["versions"][version] = n  # type: ignore[index]
            entry["active"] = version
        elif op == "delete-version":
            if entry is None or n not in entry["versions"]:  # type: ignore[operator]
                with pytest.raises(NotFoundError):
                    reg.delete(tenant, name, n)
                continue
            reg.delete(tenant, name, n)
            del entry["versions"][n]  # type: ignore[attr-defined]
            if not entry["versions"]:
                del model[(tenant, name)]
            elif entry["active"] == n:
                entry["active"] = max(entry["versions"])  # type: ignore[call-overload]
        else:
            if entry is None:
                with pytest.raises(NotFoundError):
                    reg.delete(tenant, name)
                continue
            reg.delete(tenant, name)
            del model[(tenant, name)]
    # Every tenant's view equals the model; refcounts equal the number of users per digest.
    for tenant in ("t_a", "t_b", "t_c"):
        want = sorted(
            (name, v, _digest(f"s{seed}"), v == e["active"])
            for (t, name), e in model.items()
            if t == tenant
            for v, seed in e["versions"].items()  # type: ignore[attr-defined]
        )
        got = [(a.name, a.version, a.digest, a.active) for a in reg.list(tenant)]
        assert got == want
        for name in ("n1", "n2"):
            e = model.get((tenant, name))
            if e is None:
                with pytest.raises(NotFoundError):
                    reg.resolve(tenant, name)
            else:
                assert reg.resolve(tenant, name).version == e["active"]
        refs = {d: int(c) for d, c in raw.hgetall(keys.adapter_refs(tenant)).items()}
        users: dict[str, int] = {}
        for _, _, d, _ in want:
            users[d] = users.get(d, 0) + 1
        assert refs == users


async def test_async_registry_and_unreachable_redis(valkey_url: str, raw: redis.Redis[str]) -> None:
    state = ClusterState(valkey_url)
    records, offloop = state.adapters, OffLoop()
    with trio.fail_after(10):
        d = _digest("x")
        v = await offloop.run(
            records.register,
            "t_a",
            "n",
            digest=d,
            object_key=f"adapters/t_a/{d}",
            rank=4,
            lora_alpha=8,
            target_modules=["q_proj"],
            size_bytes=1,
            base_model="m",
        )
        assert v.version == 1
        assert (await offloop.run(records.resolve, "t_a", "n@1")).digest == d
        assert [a.version for a in await offloop.run(records.list, "t_a")] == [1]
        await offloop.run(records.delete, "t_a", "n")
        await offloop.run(state.close)
    dead = ClusterState("redis://127.0.0.1:1", socket_connect_timeout_s=0.5, retries=0)
    with dead, pytest.raises(UnavailableError):
        dead.adapters.resolve("t_a", "n")


# --- staging, the active pointer's compare-and-set, versions and metadata -------------------


def _stage(reg: AdapterRecords, tenant: str, name: str, seed: str, **kw: object) -> int:
    d = _digest(seed)
    return reg.register(
        tenant,
        name,
        digest=d,
        object_key=f"adapters/{tenant}/{d}",
        rank=8,
        lora_alpha=16.0,
        target_modules=["q_proj"],
        size_bytes=10,
        base_model="tiny-llama",
        activate=False,
        **kw,  # type: ignore[arg-type]
    ).version


def test_staged_versions_answer_by_version_only_until_activated(reg: AdapterRecords) -> None:
    assert _stage(reg, "t_a", "chat", "one") == 1
    with pytest.raises(NotFoundError):  # nothing active yet
        reg.resolve("t_a", "chat")
    assert reg.resolve("t_a", "chat@1").digest == _digest("one")
    [v1] = reg.versions("t_a", "chat")
    assert (v1.staged, v1.active, v1.parent_version) == (True, False, None)
    on = reg.activate("t_a", "chat", 1, expect_active=0)
    assert (on.active, on.staged) == (True, False)
    v2 = _stage(
        reg,
        "t_a",
        "chat",
        "two",
        dataset_digest="sha256:abc",
        hyperparams={"lr": 1e-4, "epochs": 2, "targets": ["q_proj"]},
        metrics={"final_loss": 0.25},
        source="train",
    )
    assert reg.resolve("t_a", "chat").version == 1  # staging does not move the pointer
    rows = reg.versions("t_a", "chat")
    assert [(r.version, r.active, r.staged, r.parent_version) for r in rows] == [
        (1, True, False, None),
        (2, False, True, 1),  # the parent defaults to the version active at registration
    ]
    assert rows[1].metrics == {"final_loss": 0.25} and rows[1].source == "train"
    assert rows[1].hyperparams == {"epochs": 2, "lr": 1e-4, "targets": ["q_proj"]}
    assert rows[1].dataset_digest == "sha256:abc"
    assert reg.activate("t_a", "chat", v2, expect_active=1).version == 2
    assert reg.resolve("t_a", "chat").version == 2
    # Rollback is activation of an older version; its records are unchanged.
    assert reg.activate("t_a", "chat", 1, expect_active=2).active
    assert reg.resolve("t_a", "chat").digest == _digest("one")
    assert [r.staged for r in reg.versions("t_a", "chat")] == [False, False]


def test_activate_is_a_compare_and_set(reg: AdapterRecords) -> None:
    _push(reg, "t_a", "chat", "one")
    _stage(reg, "t_a", "chat", "two")
    _stage(reg, "t_a", "chat", "three")
    reg.activate("t_a", "chat", 2, expect_active=1)
    with pytest.raises(InvalidRequest) as err:  # a concurrent swap moved the pointer first
        reg.activate("t_a", "chat", 3, expect_active=1)
    assert err.value.field == "version"
    assert reg.resolve("t_a", "chat").version == 2
    with pytest.raises(InvalidRequest):
        reg.activate("t_a", "chat", 3, expect_active=0)  # "none active" is not true either
    assert reg.activate("t_a", "chat", 3).version == 3  # no expectation: no check
    with pytest.raises(NotFoundError):
        reg.activate("t_a", "chat", 9, expect_active=3)
    for bad in (0, -1, True, "2", 2**60):
        with pytest.raises(InvalidRequest):
            reg.activate("t_a", "chat", bad)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        reg.activate("t_a", "no such/name", 1)


def test_activate_races_let_exactly_one_swap_win(reg: AdapterRecords) -> None:
    _push(reg, "t_a", "chat", "one")
    staged = [_stage(reg, "t_a", "chat", f"s{i}") for i in range(8)]
    wins = []
    for v in staged:  # every swap saw version 1 active; only the first flip may land
        try:
            wins.append(reg.activate("t_a", "chat", v, expect_active=1).version)
        except InvalidRequest:
            pass
    assert wins == [staged[0]] and reg.resolve("t_a", "chat").version == staged[0]


def test_deleting_staged_and_active_versions(reg: AdapterRecords) -> None:
    _push(reg, "t_a", "chat", "one")
    _push(reg, "t_a", "chat", "two")
    _stage(reg, "t_a", "chat", "three")
    # A staged version that never went active deletes cleanly; its object is freed.
    gone = reg.delete("t_a", "chat", 3)
    assert gone.freed_object_keys == (f"adapters/t_a/{_digest('three')}",)
    assert reg.resolve("t_a", "chat").version == 2
    # Deleting the active version: the newest remaining one that was ever active takes over,
    # not a staged one (a swap in progress).
    _stage(reg, "t_a", "chat", "four")
    reg.delete("t_a", "chat", 2)
    assert reg.resolve("t_a", "chat").version == 1
    assert [(r.version, r.staged) for r in reg.versions("t_a", "chat")] == [(1, False), (4, True)]
    # With only staged versions left, the newest becomes active.
    reg.delete("t_a", "chat", 1)
    active = reg.resolve("t_a", "chat")
    assert active.version == 4 and not reg.get("t_a", "chat").staged
    # A name with only staged versions: deleting one activates nothing.
    _stage(reg, "t_a", "other", "x")
    _stage(reg, "t_a", "other", "y")
    reg.delete("t_a", "other", 2)
    with pytest.raises(NotFoundError):
        reg.resolve("t_a", "other")
    reg.delete("t_a", "other")
    with pytest.raises(NotFoundError):
        reg.versions("t_a", "other")


def test_versions_and_activate_are_per_tenant(reg: AdapterRecords) -> None:
    _push(reg, "t_a", "chat", "one")
    _stage(reg, "t_a", "chat", "two")
    for call in (
        lambda: reg.versions("t_b", "chat"),
        lambda: reg.activate("t_b", "chat", 2),
        lambda: reg.activate("t_b", "chat", 1, expect_active=1),
    ):
        with pytest.raises(NotFoundError) as err:
            call()
        assert err.value.field == "adapter"
    assert reg.resolve("t_a", "chat").version == 1
    with pytest.raises(NotFoundError):
        reg.versions("t_a", "../chat")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hyperparams", {"lr": float("nan")}),
        ("hyperparams", {1: 2}),
        ("hyperparams", ["not", "an", "object"]),
        ("hyperparams", {"big": "x" * 20_000}),
        ("metrics", {"f": object()}),
        ("metrics", "0.5"),
        ("dataset_digest", "has spaces"),
        ("dataset_digest", "x" * 129),
        ("source", "pickle"),
        ("parent_version", 0),
        ("parent_version", True),
    ],
)
def test_bad_metadata_is_refused_before_anything_is_written(
    reg: AdapterRecords, raw: redis.Redis[str], field: str, value: object
) -> None:
    with pytest.raises(InvalidRequest) as err:
        _stage(reg, "t_a", "chat", "one", **{field: value})
    assert err.value.field == field
    assert raw.keys("*") == []
