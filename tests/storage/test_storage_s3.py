"""The S3 object store against a real SeaweedFS server on loopback.

Rules: loopback only, free ports; every async test under ``trio.fail_after``; a killed
server must give a typed, retriable error within a bounded time.
"""

from __future__ import annotations

import time
import uuid

import pytest
import trio
import trio.lowlevel

from tests.storage.conftest import s3_store
from tests.storage.seaweed import SeaweedS3
from vajra.errors import NotFoundError, PayloadTooLarge, UnavailableError
from vajra.storage import S3ObjectStore


def test_put_get_exists_delete_list_blocking(s3: S3ObjectStore) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    s3.put("adapters/t_1/d/adapter_model.safetensors", data)  # the bucket is created on first use
    s3.put("adapters/t_1/d/adapter_config.json", b"{}")
    assert s3.get("adapters/t_1/d/adapter_model.safetensors") == data
    assert s3.exists("adapters/t_1/d/adapter_config.json")
    assert not s3.exists("adapters/t_1/d/nope")
    assert s3.list_keys("adapters/t_1/") == [
        "adapters/t_1/d/adapter_config.json",
        "adapters/t_1/d/adapter_model.safetensors",
    ]
    s3.delete("adapters/t_1/d/adapter_config.json")
    s3.delete("adapters/t_1/d/adapter_config.json")  # idempotent
    with pytest.raises(NotFoundError) as nf:
        s3.get("adapters/t_1/d/adapter_config.json")
    assert nf.value.field == "key"


async def test_a_bounded_read_refuses_an_object_over_the_limit(s3: S3ObjectStore) -> None:
    data = b"y" * 300_000
    s3.put("datasets/t_1/big.jsonl", data)
    assert s3.get("datasets/t_1/big.jsonl", max_bytes=300_000) == data
    with pytest.raises(PayloadTooLarge) as e:
        s3.get("datasets/t_1/big.jsonl", max_bytes=299_999)
    assert e.value.field == "key" and "300000 bytes" in e.value.message
    with trio.fail_after(30):
        assert await s3.aget("datasets/t_1/big.jsonl", max_bytes=1 << 20) == data
        with pytest.raises(PayloadTooLarge):
            await s3.aget("datasets/t_1/big.jsonl", max_bytes=1024)
        with pytest.raises(NotFoundError):
            await s3.aget("datasets/t_1/none.jsonl", max_bytes=1024)
        # The connection is fine after a refused read (its body was dropped unread).
        assert await s3.aget("datasets/t_1/big.jsonl") == data


async def test_trio_api_bridges_to_the_asyncio_thread(s3: S3ObjectStore) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(s3.aput, f"k/{i}", bytes([i]) * 10_000)
            # The Trio loop keeps running while S3 calls are in flight.
            ticks = 0
            while len(nursery.child_tasks) > 0 and ticks < 10_000:
                await trio.lowlevel.checkpoint()
                ticks += 1
        assert ticks > 0
        assert await s3.alist_keys("k/") == [f"k/{i}" for i in range(6)]
        assert await s3.aget("k/2") == b"\x02" * 10_000
        assert await s3.aexists("k/2")
        await s3.adelete("k/2")
        with pytest.raises(NotFoundError):
            await s3.aget("k/2")


@pytest.mark.slow
async def test_killed_server_gives_unavailable_then_recovers(seaweed: SeaweedS3) -> None:
    store = s3_store(
        seaweed,
        bucket=f"vajra-{uuid.uuid4().hex[:12]}",
        connect_timeout_s=1.0,
        read_timeout_s=2.0,
        op_timeout_s=5.0,
    )
    try:
        with trio.fail_after(60):
            await store.aput("x", b"before")
            seaweed.kill()
            try:
                t0 = time.monotonic()
                with pytest.raises(UnavailableError) as exc:
                    await store.aget("x")
                assert exc.value.retriable
                assert time.monotonic() - t0 < 6.0
                with pytest.raises(UnavailableError):
                    store.put("y", b"blocking API too")
            finally:
                await trio.to_thread.run_sync(seaweed.start)
            # The same client reconnects; a just-restarted SeaweedFS answers "retry" (a
            # retriable UnavailableError) for a moment while its volume server registers.
            with trio.fail_after(20):
                while True:
                    try:
                        assert await store.aget("x") == b"before"
                        break
                    except UnavailableError:
                        await trio.sleep(0.2)
    finally:
        store.close()
