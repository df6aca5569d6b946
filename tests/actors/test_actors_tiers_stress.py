"""A randomised concurrency stress of the adapter tiers.

Test rules: a tiny host slab (one slot per size class), a tiny GPU pool short of memory, a disk cache with
room for six of the sixteen adapters that fails one write in ten (ENOSPC) and one read in
twenty (EIO), and real PEFT adapters of mixed ranks; many tasks acquire and
release on a seeded random schedule while another task holds the GPU limiter at random points
(as engine steps do) and another promotes and demotes. After every successful acquire, and
again before its release, the slot must hold that adapter packed from its own files; every
acquire finishes within a bound; every failure is a typed, retriable VajraError.
"""

from __future__ import annotations

import errno
import random
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
)
from vajra.adapters.format import base_model_spec
from vajra.errors import OverloadedError, TimeoutError, UnavailableError, VajraError
from vajra.storage import LocalObjectStore

SEED = 20240611
RANKS = (2, 4, 8, 8, 12, 16, 16, 24, 32, 32, 40, 48, 64, 4, 20, 64)
ACQUIRE_BOUND_S = 15.0
RETRIABLE = (OverloadedError, UnavailableError, TimeoutError)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return save_adapters(tiny_model_dir, tmp_path_factory.mktemp("peft"), RANKS, seed=11)


def _flaky_disk(monkeypatch: pytest.MonkeyPatch, disk: Path, seed: int) -> None:
    """Writes under ``disk`` fail with ENOSPC one time in ten, reads with EIO one in twenty."""
    rng = random.Random(seed)
    real_write, real_read = Path.write_bytes, Path.read_bytes

    def write_bytes(self: Path, data: Any) -> int:
        if disk in self.parents and rng.random() < 0.1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, data)

    def read_bytes(self: Path) -> bytes:
        if disk in self.parents and rng.random() < 0.05:
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)


async def _stress(
    tmp_path: Path,
    model_dir: Path,
    adapter_dirs: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    *,
    workers: int,
    ops: int,
    seed: int,
) -> dict[str, int]:
    spec = base_model_spec(model_dir)
    stored = store_adapters(LocalObjectStore(tmp_path / "objects"), adapter_dirs, spec)
    pool = make_pool(spec, 6, 24)  # memory for fewer than six of the larger adapters
    limiter = trio.CapacityLimiter(1)
    disk_bytes = sum(sorted(a.size_bytes for a in stored)[-6:])
    tiers = make_tiers(
        tmp_path, model_dir, pool, limiter, disk_cache_bytes=disk_bytes, threshold=0.67
    )
    want = {a.digest: expected_units(a, spec, pool) for a in stored}
    _flaky_disk(monkeypatch, tmp_path / "disk", seed)
    counts = {"ok": 0, "overloaded": 0, "unavailable": 0, "timeout": 0, "steps": 0}
    done = trio.Event()

    def check(slot: int, a: KitAdapter) -> None:
        assert slot_holds(pool, slot, a, want[a.digest]), f"slot {slot} does not hold {a.path.name}"

    async def worker(rng: random.Random) -> None:
        for _ in range(ops):
            a = rng.choice(stored)
            try:
                with trio.fail_after(ACQUIRE_BOUND_S):
                    slot = await tiers.acquire(a.digest, a.key)
            except VajraError as exc:
                assert isinstance(exc, RETRIABLE) and exc.retriable, repr(exc)
                counts[exc.code.value] += 1
                continue
            check(slot, a)
            counts["ok"] += 1
            await trio.sleep(rng.random() * 0.003)
            check(slot, a)
            tiers.release(a.digest)
            await trio.sleep(rng.random() * 0.002)

    async def engine(rng: random.Random) -> None:
        step = EngineStep(limiter)
        while not done.is_set():
            await trio.sleep(rng.random() * 0.004)
            await step.hold()
            await trio.sleep(rng.random() * 0.008)
            step.end()
            counts["steps"] += 1

    async def predictor(rng: random.Random) -> None:
        while not done.is_set():
            await trio.sleep(rng.random() * 0.01)
            a = rng.choice(stored)
            if rng.random() < 0.5:
                tiers.demote(a.digest, rng.choice(("gpu", "host", "disk")))
                continue
            try:
                with trio.fail_after(ACQUIRE_BOUND_S):
                    await tiers.promote(a.digest, a.key, rng.choice(("gpu", "host", "disk")))
            except VajraError as exc:
                assert isinstance(exc, RETRIABLE), repr(exc)

    rng = random.Random(seed)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(engine, random.Random(rng.random()))
            nursery.start_soon(predictor, random.Random(rng.random()))
            async with trio.open_nursery() as clients:
                for _ in range(workers):
                    clients.start_soon(worker, random.Random(rng.random()))
            done.set()
    monkeypatch.undo()

    # Quiet again: nothing held, nothing leaked, every table agrees with what it describes.
    assert not tiers.refs and not tiers._wanted and not tiers._loading
    assert tiers.slots.resident() == {s: d for d, s in tiers.gpu.items()}
    for digest, slot in tiers.gpu.items():
        assert torch.equal(pool.read_back(slot), want[digest])
    host = tiers.host
    for digest, entry in host.entries.items():
        assert not entry.busy() and entry.host is not None
        assert torch.equal(entry.host.buffer, want[digest])
    assert all(not e.busy() for e in host._retired)
    slots = [buf.shape[0] for _, buf in host.classes]
    for c, n in enumerate(slots):
        cached = sum(1 for e in host.entries.values() if e.c == c)
        retired = sum(1 for e in host._retired if e.c == c)
        assert len(host._free[c]) + cached + retired == n
        assert len(set(host._free[c])) == len(host._free[c])
    disk = tiers.disk
    assert disk.used_bytes == sum(disk.entries.values()) <= disk.capacity_bytes
    for digest in disk.entries:
        assert (disk.root / digest / "adapter_model.safetensors").exists()
    assert counts["ok"] > workers * ops // 2, counts
    assert tiers.stats["disk"].errors > 0  # the flaky disk cost the cache, never a request
    return counts


async def test_tiers_stay_correct_under_a_random_concurrent_schedule(
    tmp_path: Path, tiny_model_dir: Path, adapter_dirs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = await _stress(
        tmp_path, tiny_model_dir, adapter_dirs, monkeypatch, workers=10, ops=30, seed=SEED
    )
    assert counts["steps"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
async def test_tiers_stay_correct_under_a_long_random_schedule(
    tmp_path: Path,
    tiny_model_dir: Path,
    adapter_dirs: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
) -> None:
    await _stress(
        tmp_path, tiny_model_dir, adapter_dirs, monkeypatch, workers=24, ops=60, seed=SEED + seed
    )
