"""The adapter tiers under contention, one defect per test: real trio tasks, real worker
threads, the real GPU limiter held by another task (as an engine step holds it) at chosen points.

Test rules: a tiny model and adapters saved by PEFT itself; a CPU pool; every slot checked
against the adapter packed from its own files; every test under ``trio.fail_after``.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from tests.actors.tier_kit import (
    EngineStep,
    KitAdapter,
    expected_units,
    make_pool,
    make_tiers,
    save_adapters,
    slot_holds,
    store_adapters,
    tiers_mod,
    until,
)
from vajra.adapters.format import BaseModelSpec, base_model_spec
from vajra.errors import InternalError, OverloadedError, VajraError
from vajra.storage import LocalObjectStore

RANKS = (4, 8, 6, 2, 16, 12, 48, 64, 40, 56, 36, 64)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save_adapters(tiny_model_dir, tmp_path_factory.mktemp("peft"), RANKS, seed=7)


@pytest.fixture
def spec(tiny_model_dir: Path) -> BaseModelSpec:
    return base_model_spec(tiny_model_dir)


@pytest.fixture
def stored(tmp_path: Path, adapter_dirs: list[Path], spec: BaseModelSpec) -> list[KitAdapter]:
    return store_adapters(LocalObjectStore(tmp_path / "objects"), adapter_dirs, spec)


@pytest.mark.parametrize(
    "host_ranks", [(8, 16, 32, 64), (16,)], ids=["spill-to-a-larger-class", "staging-buffer"]
)
async def test_a_gpu_slot_holds_its_own_weights_while_its_host_slot_is_wanted(
    tmp_path: Path,
    tiny_model_dir: Path,
    spec: BaseModelSpec,
    stored: list[KitAdapter],
    host_ranks: tuple[int, ...],
) -> None:
    """Item 2: X waits for the GPU with its weights in the only host slot of its class; Y,
    packed meanwhile, must not take that slot."""
    pool = make_pool(spec, 2, 16)
    limiter = trio.CapacityLimiter(1)
    tiers = make_tiers(  # one host slot per size class
        tmp_path, tiny_model_dir, pool, limiter, host_rank_classes=host_ranks
    )
    x, y = stored[0], stored[1]  # ranks 4 and 8: the same, smallest, host class
    step = EngineStep(limiter)
    slots: dict[str, int] = {}

    async def take(a: KitAdapter) -> None:
        slots[a.digest] = await tiers.acquire(a.digest, a.key)

    with trio.fail_after(30):
        await step.hold()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(take, x)
            await until(lambda: step.waiting() == 1)  # X packed, waiting for the GPU
            nursery.start_soon(take, y)
            await until(lambda: step.waiting() == 2)  # Y packed too
            step.end()
    for a in (x, y):
        want = expected_units(a, spec, pool)
        assert slot_holds(pool, slots[a.digest], a, want), f"slot of {a.path.name} is wrong"
    for digest, entry in tiers.host.entries.items():  # the host tier is consistent too
        a = next(a for a in stored if a.digest == digest)
        assert entry.host is not None
        assert torch.equal(entry.host.buffer, expected_units(a, spec, pool))


async def test_acquire_neither_spins_nor_evicts_its_own_load_when_the_rest_is_held(
    tmp_path: Path,
    tiny_model_dir: Path,
    spec: BaseModelSpec,
    stored: list[KitAdapter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Item 9: past the eviction threshold with every other adapter held, the new adapter
    stays; with every slot held, a retriable OverloadedError at once; never a load loop."""
    pool = make_pool(spec, 4, 16)
    tiers = make_tiers(tmp_path, tiny_model_dir, pool, trio.CapacityLimiter(1), threshold=0.5)
    calls = {"load": 0, "free": 0}
    real_load, real_free = pool.load, pool.free

    def load(host: Any) -> int:
        calls["load"] += 1
        return real_load(host)

    def free(slot: int) -> None:
        calls["free"] += 1
        real_free(slot)

    monkeypatch.setattr(pool, "load", load)
    monkeypatch.setattr(pool, "free", free)
    a, b, c, d, e = stored[:5]  # ranks 4, 8, 6, 2, 16
    with trio.fail_after(30):
        for held in (a, b):
            await tiers.acquire(held.digest, held.key)
        slot_c = None
        with trio.move_on_after(3):
            slot_c = await tiers.acquire(c.digest, c.key)  # 3 resident > threshold of 2
        assert slot_c is not None, f"acquire spun: {calls}"
        assert calls == {"load": 3, "free": 0}
        assert slot_holds(pool, slot_c, c, expected_units(c, spec, pool))
        await tiers.acquire(d.digest, d.key)  # the last slot
        with trio.fail_after(2), pytest.raises(OverloadedError) as full:
            await tiers.acquire(e.digest, e.key)
        assert full.value.retriable
        assert calls == {"load": 4, "free": 0}
        tiers.release(c.digest)  # now C is idle: E takes its slot
        slot_e = await tiers.acquire(e.digest, e.key)
        assert slot_holds(pool, slot_e, e, expected_units(e, spec, pool))
        assert calls == {"load": 5, "free": 1}


async def test_only_an_adapter_whose_eviction_makes_room_is_evicted(
    tmp_path: Path,
    tiny_model_dir: Path,
    spec: BaseModelSpec,
    stored: list[KitAdapter],
) -> None:
    """GPU memory is per module kind: the new adapter lacks down_proj pages only, so the
    least-recently-used idle adapter on q/k/v/o stays and the one holding down_proj goes."""
    pool = make_pool(spec, 4, 4)  # 16 pages per kind
    tiers = make_tiers(tmp_path, tiny_model_dir, pool, trio.CapacityLimiter(1))
    attn, mlp, new = stored[1], stored[2], stored[4]  # r8 q/k/v/o, r6 gate/up/down, r16 q/v/down
    with trio.fail_after(30):
        for a in (attn, mlp):  # attn is the least recently used
            await tiers.acquire(a.digest, a.key)
            tiers.release(a.digest)
        slot = await tiers.acquire(new.digest, new.key)
    assert slot_holds(pool, slot, new, expected_units(new, spec, pool))
    assert list(tiers.gpu) == [attn.digest, new.digest]
    assert tiers.stats["gpu"].evictions == 1


async def test_concurrent_cold_loads_filling_a_host_class_never_get_invalid_adapter(
    tmp_path: Path,
    tiny_model_dir: Path,
    spec: BaseModelSpec,
    stored: list[KitAdapter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Item 9: six cold rank > 32 adapters at once against one host slot (of rank 64)."""
    pool = make_pool(spec, 9, 64)
    tiers = make_tiers(
        tmp_path, tiny_model_dir, pool, trio.CapacityLimiter(1), host_rank_classes=(64,)
    )
    big = [a for a in stored if a.rank > 32]
    assert len(big) == 6
    real_pack = tiers_mod.pack_adapter

    def slow_pack(*args: Any, **kwargs: Any) -> Any:  # packs overlap in worker threads
        time.sleep(0.2)
        return real_pack(*args, **kwargs)

    monkeypatch.setattr(tiers_mod, "pack_adapter", slow_pack)
    outcomes: dict[str, int | VajraError] = {}

    async def take(a: KitAdapter) -> None:
        try:
            outcomes[a.digest] = await tiers.acquire(a.digest, a.key)
        except VajraError as exc:
            outcomes[a.digest] = exc

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for a in big:
                nursery.start_soon(take, a)
    failed = [o for o in outcomes.values() if isinstance(o, VajraError)]
    assert all(e.retriable for e in failed), failed
    assert len(failed) < len(big)
    for a in big:
        slot = outcomes[a.digest]
        if isinstance(slot, int):
            assert slot_holds(pool, slot, a, expected_units(a, spec, pool)), a.path.name


async def test_a_failing_disk_costs_the_cache_not_the_request(
    tmp_path: Path,
    tiny_model_dir: Path,
    spec: BaseModelSpec,
    stored: list[KitAdapter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Item 9: ENOSPC writing the disk cache, then EIO reading it: served from memory, counted."""
    pool = make_pool(spec, 8, 32)
    tiers = make_tiers(tmp_path, tiny_model_dir, pool, trio.CapacityLimiter(1))
    disk = tmp_path / "disk"
    real_write, real_read = Path.write_bytes, Path.read_bytes

    def full_disk(self: Path, data: Any) -> int:
        if disk in self.parents:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data)

    def failing_disk(self: Path) -> bytes:
        if disk in self.parents:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_read(self)

    a, b = stored[0], stored[4]
    with trio.fail_after(30):
        monkeypatch.setattr(Path, "write_bytes", full_disk)
        slot = await tiers.acquire(a.digest, a.key)
        assert slot_holds(pool, slot, a, expected_units(a, spec, pool))
        assert tiers.stats["disk"].errors == 1
        assert a.digest not in tiers.disk and tiers.disk.used_bytes == 0
        assert not list(disk.iterdir())  # nothing half-written left behind
        monkeypatch.undo()

        slot = await tiers.acquire(b.digest, b.key)
        assert b.digest in tiers.disk
        tiers.release(b.digest)
        tiers.demote(b.digest, "host")  # only the disk copy is left
        monkeypatch.setattr(Path, "read_bytes", failing_disk)
        slot = await tiers.acquire(b.digest, b.key)
        monkeypatch.undo()
        assert slot_holds(pool, slot, b, expected_units(b, spec, pool))
        assert tiers.stats["disk"].errors == 2 and tiers.stats["disk"].hits == 0


async def test_a_torch_error_while_packing_or_copying_is_a_typed_error(
    tmp_path: Path,
    tiny_model_dir: Path,
    spec: BaseModelSpec,
    stored: list[KitAdapter],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Item 9: a RuntimeError in a tensor op reaches every caller as InternalError, and the
    host slot it was packing into or copying from is given back."""
    pool = make_pool(spec, 2, 16)
    tiers = make_tiers(  # one host slot, for A then B
        tmp_path, tiny_model_dir, pool, trio.CapacityLimiter(1), host_rank_classes=(16,)
    )
    a, b = stored[0], stored[1]

    def broken_pack(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    def broken_load(host: Any) -> int:
        raise RuntimeError("CUDA error: out of resources (simulated)")

    errors: list[VajraError] = []

    async def take(x: KitAdapter) -> None:
        try:
            await tiers.acquire(x.digest, x.key)
        except VajraError as exc:
            errors.append(exc)

    with trio.fail_after(30):
        monkeypatch.setattr(tiers_mod, "pack_adapter", broken_pack)
        async with trio.open_nursery() as nursery:
            for _ in range(3):  # one loads, two wait for it: all get its error
                nursery.start_soon(take, a)
        with pytest.raises(InternalError):
            await tiers.promote(a.digest, a.key, "host")
        monkeypatch.undo()
        assert len(errors) == 3 and all(isinstance(e, InternalError) for e in errors), errors
        assert "RuntimeError" in errors[0].message

        slot = await tiers.acquire(a.digest, a.key)  # the host slot was given back
        assert slot_holds(pool, slot, a, expected_units(a, spec, pool))
        assert a.digest in tiers.host.entries
        tiers.release(a.digest)
        tiers.demote(a.digest, "gpu")  # cached on the host only

        monkeypatch.setattr(pool, "load", broken_load)
        with pytest.raises(InternalError):
            await tiers.acquire(a.digest, a.key)
        monkeypatch.undo()
        slot = await tiers.acquire(b.digest, b.key)  # A's host slot is not left pinned
        assert b.digest in tiers.host.entries and a.digest not in tiers.host.entries
        assert slot_holds(pool, slot, b, expected_units(b, spec, pool))
        assert not tiers.refs.keys() - {b.digest}


async def test_an_adapter_forgotten_while_its_disk_copy_is_written_is_not_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A demote (forget) racing the write of the same digest: the finished write must neither
    list the digest nor leave its files (a listed entry without files broke later reads)."""
    from vajra.actors import adapter_cache

    release = trio.Event()
    started = trio.Event()
    real_write = adapter_cache._write_files

    def slow_write(*args: Any) -> None:
        real_write(*args)
        trio.from_thread.run_sync(started.set)
        trio.from_thread.run(release.wait)

    monkeypatch.setattr(adapter_cache, "_write_files", slow_write)
    disk = adapter_cache.DiskCache(tmp_path / "disk", 1 << 20, io=trio.CapacityLimiter(2))
    digest = "ab" * 32
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            written: list[bool] = []

            async def write() -> None:
                written.append(await disk.write(digest, b"{}", b"weights"))

            nursery.start_soon(write)
            await started.wait()  # the files are on disk, the write not yet accounted
            disk.forget(digest)
            release.set()
    assert written == [False]
    assert digest not in disk and disk.used_bytes == 0
    assert not (tmp_path / "disk" / digest).exists()
