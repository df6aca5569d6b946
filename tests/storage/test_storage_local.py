"""The local-directory object store: round trips, atomic replace, missing keys, bad keys.

Rules: temp dirs only; async tests under ``trio.fail_after``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vajra.config import VajraConfig
from vajra.errors import InvalidRequest, NotFoundError, PayloadTooLarge
from vajra.storage import LocalObjectStore, S3ObjectStore, open_store


async def test_a_bounded_read_refuses_an_object_over_the_limit(local_root: Path) -> None:
    store = LocalObjectStore(local_root)
    store.put("datasets/t_1/big", b"x" * 1000)
    assert store.get("datasets/t_1/big", max_bytes=1000) == b"x" * 1000
    with pytest.raises(PayloadTooLarge) as e:
        store.get("datasets/t_1/big", max_bytes=999)
    assert e.value.field == "key" and "1000 bytes" in e.value.message
    with trio.fail_after(10):
        assert await store.aget("datasets/t_1/big", max_bytes=5000) == b"x" * 1000
        with pytest.raises(PayloadTooLarge):
            await store.aget("datasets/t_1/big", max_bytes=10)
        with pytest.raises(NotFoundError):
            await store.aget("datasets/t_1/none", max_bytes=10)


def test_put_get_exists_delete_list(local_root: Path) -> None:
    store = LocalObjectStore(local_root)
    assert store.list_keys() == []
    store.put("adapters/t_1/abc/adapter_config.json", b"{}")
    store.put("adapters/t_1/abc/adapter_model.safetensors", b"x" * 1000)
    store.put("other/key", b"")
    assert store.get("adapters/t_1/abc/adapter_config.json") == b"{}"
    assert store.get("other/key") == b""
    assert store.exists("other/key") and not store.exists("other/nope")
    assert store.list_keys("adapters/") == [
        "adapters/t_1/abc/adapter_config.json",
        "adapters/t_1/abc/adapter_model.safetensors",
    ]
    store.put("other/key", b"new")  # replace
    assert store.get("other/key") == b"new"
    store.delete("other/key")
    store.delete("other/key")  # idempotent
    assert not store.exists("other/key")
    assert not (local_root / "other").exists()  # empty directories are removed
    with pytest.raises(NotFoundError) as nf:
        store.get("other/key")
    assert nf.value.field == "key"
    # No temporary files are left behind.
    assert not [p for p in local_root.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/../b", "..", "a/./b", "sp ace", "a/b/", "x" * 513, "ü"]
)
def test_bad_keys_are_refused_before_any_io(local_root: Path, key: str) -> None:
    store = LocalObjectStore(local_root)
    with pytest.raises(InvalidRequest) as exc:
        store.put(key, b"x")
    assert exc.value.field == "key"
    assert not local_root.exists()


async def test_trio_api_runs_off_the_loop(local_root: Path) -> None:
    store = LocalObjectStore(local_root)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(store.aput, f"k/{i}", bytes([i]) * 100)
        assert await store.alist_keys("k/") == [f"k/{i}" for i in range(8)]
        assert await store.aget("k/3") == b"\x03" * 100
        assert await store.aexists("k/3")
        await store.adelete("k/3")
        assert not await store.aexists("k/3")
        with pytest.raises(NotFoundError):
            await store.aget("k/3")


def test_open_store_follows_the_config(tmp_path: Path) -> None:
    cfg = VajraConfig().replace("cluster", home=str(tmp_path))
    store = open_store(cfg)
    assert isinstance(store, LocalObjectStore) and store.root == tmp_path / "objects"
    store = open_store(cfg.replace("storage", local_dir=str(tmp_path / "elsewhere")))
    assert isinstance(store, LocalObjectStore) and store.root == tmp_path / "elsewhere"
    s3 = open_store(cfg.replace("storage", kind="s3", s3_endpoint="http://127.0.0.1:1"))
    assert isinstance(s3, S3ObjectStore) and s3.bucket == "vajra"
    with pytest.raises(InvalidRequest):
        open_store(cfg.replace("storage", kind="ftp"))
