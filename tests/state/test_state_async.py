"""The cluster state from Trio (through an OffLoop), and the unreachable-store path.

Rules: loopback only; every async test runs under ``trio.fail_after``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
import trio
import trio.lowlevel

from vajra.errors import UnavailableError
from vajra.state import (
    ClusterState,
    EmbeddedValkey,
    ExecutorHeartbeat,
    OffLoop,
    UsageRecord,
    UsageTotals,
)


@pytest.fixture
def offloop() -> OffLoop:
    return OffLoop()


async def test_async_round_trip(state: ClusterState, offloop: OffLoop) -> None:
    with trio.fail_after(10):
        await offloop.run(state.ping)
        record, api_key = await offloop.run(state.tenants.create, "acme")
        assert await offloop.run(state.api_keys.authenticate, api_key) == record
        assert await offloop.run(state.tenants.get, record.tenant_id) == record
        assert await offloop.run(state.tenants.get_by_name, "acme") == record
        assert await offloop.run(state.tenants.list) == [record]
        second = await offloop.run(state.api_keys.create, record.tenant_id)
        assert await offloop.run(state.api_keys.revoke, second) is True

        hb = ExecutorHeartbeat("e0", "i1", "m", "cpu", 1, 0, 0, ("a",), 8, 1)
        await offloop.run(state.heartbeats.write, hb, 30)
        assert await offloop.run(state.heartbeats.list) == [hb]

        await offloop.run(state.events.record, "a", 7)
        assert (await offloop.run(state.events.stats, "a")).last_ms == 7

        purge = await offloop.run(state.tenants.delete, record.tenant_id)
        assert purge is not None and purge.name == "acme" and purge.object_keys == ()
        assert await offloop.run(state.api_keys.authenticate, api_key) is None
        assert await offloop.run(state.tenants.delete, record.tenant_id) is None


async def test_concurrent_duplicates_count_once(state: ClusterState, offloop: OffLoop) -> None:
    rec = UsageRecord("ev-1", "t_1", "r", "e", 3.0, 1, 1, 1)
    results: list[bool] = []

    async def send() -> None:
        results.append(await offloop.run(state.usage.record, rec))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(send)
        assert sorted(results) == [False] * 19 + [True]
        assert await offloop.run(state.usage.get, "t_1") == UsageTotals("t_1", 1, 3.0, 1, 1)


async def test_async_calls_do_not_block_the_loop(state: ClusterState, offloop: OffLoop) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            for i in range(20):
                await offloop.run(state.events.record, "a", i)
            nursery.cancel_scope.cancel()
    assert ticks >= 20


def test_stopped_server_is_unavailable(stopped_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with ClusterState(stopped_url, socket_timeout_s=0.5, socket_connect_timeout_s=0.5) as cs:
        with pytest.raises(UnavailableError) as info:
            cs.ping()
        assert info.value.retriable
        # The message reaches clients: no address in it; the address is logged here instead.
        port = stopped_url.rsplit(":", 1)[1]
        assert "127.0.0.1" not in str(info.value) and port not in str(info.value)
        assert f"127.0.0.1:{port}" in caplog.text
        with pytest.raises(UnavailableError):
            cs.tenants.create("acme")
        with pytest.raises(UnavailableError):
            cs.api_keys.authenticate("vk_whatever")


async def test_stopped_server_is_unavailable_async(stopped_url: str, offloop: OffLoop) -> None:
    state = ClusterState(stopped_url, socket_timeout_s=0.5, socket_connect_timeout_s=0.5)
    with trio.fail_after(10):
        with pytest.raises(UnavailableError):
            await offloop.run(state.heartbeats.list)
        await offloop.run(state.close)


def test_server_stopped_mid_session(tmp_path: Path) -> None:
    server = EmbeddedValkey(tmp_path / "v")
    url = server.start()
    with ClusterState(url, socket_timeout_s=0.5, socket_connect_timeout_s=0.5) as cs:
        cs.ping()  # a pooled connection now exists
        server.stop()
        with pytest.raises(UnavailableError):
            cs.usage.get("t_1")


def test_password_is_not_in_errors(stopped_url: str) -> None:
    url = stopped_url.replace("redis://", "redis://user:hunter2@")
    with (
        ClusterState(url, socket_connect_timeout_s=0.5) as cs,
        pytest.raises(UnavailableError) as info,
    ):
        cs.ping()
    assert "hunter2" not in str(info.value)
    assert "***" in cs.address


def test_embedded_data_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "persist"
    with EmbeddedValkey(data_dir) as first, ClusterState(first.url) as cs:
        record, api_key = cs.tenants.create("acme")
    assert not first.running
    with EmbeddedValkey(data_dir) as second, ClusterState(second.url) as cs:
        assert cs.api_keys.authenticate(api_key) == record
        client: redis.Redis[str] = redis.Redis.from_url(second.url, decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        client.close()


def test_embedded_stop_is_idempotent(tmp_path: Path) -> None:
    server = EmbeddedValkey(tmp_path / "v")
    server.stop()
    assert server.start().startswith(f"redis://:{server.password}@127.0.0.1:")
    with pytest.raises(RuntimeError):
        server.start()
    server.stop()
    server.stop()
    with pytest.raises(RuntimeError):
        _ = server.url


def test_embedded_on_given_port(tmp_path: Path) -> None:
    with EmbeddedValkey(tmp_path / "a") as first:
        port = int(first.url.rsplit(":", 1)[1])
        first.stop()
        with EmbeddedValkey(tmp_path / "b", port=port) as second:
            assert second.url == f"redis://:{second.password}@127.0.0.1:{port}"
            with ClusterState(second.url) as cs:
                cs.ping()
