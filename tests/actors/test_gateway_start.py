"""The gateway's start: it reads what upload validation needs (the base model's modules, so
torch and transformers) from the start, in the background, without holding clients back; a
slow or broken model never stops it, and an upload during the read waits for it.

Test rules: ipc and loopback only; every test under ``trio.fail_after``; real Valkey, a real
object store (a temp directory) and a real PEFT adapter; no scheduler or executor (neither
ping nor an upload needs one).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from tests.inprocess import inprocess_config
from tests.reference import save_peft_adapters
from vajra.actors import gateway as gateway_module
from vajra.actors import gateway_adapters
from vajra.actors.base import wait_until
from vajra.actors.gateway import Gateway
from vajra.adapters.format import BaseModelSpec, base_model_spec
from vajra.client import AsyncClient
from vajra.state import ClusterState


async def test_the_base_model_is_read_at_start_before_any_upload(
    tmp_path: Path, valkey_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[BaseModelSpec] = []

    def spec(model_dir: Path) -> BaseModelSpec:
        read.append(base_model_spec(model_dir))
        return read[-1]

    monkeypatch.setattr(gateway_adapters, "base_model_spec", spec)
    cfg = inprocess_config(tmp_path / "run", valkey_url, model=str(tiny_model_dir))
    with ClusterState(valkey_url) as state, trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(Gateway(cfg, state).run)
            await wait_until(lambda: bool(read))  # no client has asked for anything
            assert len(read) == 1 and read[0].modules
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("model", ["slow", "broken"])
async def test_a_slow_or_broken_base_model_does_not_stop_the_start(
    model: str, tmp_path: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def spec(model_dir: Path) -> BaseModelSpec:
        if model == "slow":
            release.wait(60)
        raise OSError(f"cannot read {model_dir}")

    monkeypatch.setattr(gateway_adapters, "base_model_spec", spec)
    monkeypatch.setattr(gateway_module, "_WARM_UP_LIMIT_S", 0.3)
    cfg = inprocess_config(tmp_path / "run", valkey_url, model=str(tmp_path / model))
    try:
        with ClusterState(valkey_url) as state, trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                address = await nursery.start(Gateway(cfg, state).run)
                async with AsyncClient(address, "", timeout_s=10) as c:
                    await c.ping()
                nursery.cancel_scope.cancel()
    finally:
        release.set()  # the abandoned read's thread ends


async def test_an_upload_during_a_slow_read_waits_for_it_instead_of_reading_beside_it(
    tmp_path: Path, valkey_url: str, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the start's limit the read goes on in its thread; an upload must not read the model
    at the same time (transformers' lazy import fails when two threads import it at once)."""
    [adapter] = save_peft_adapters(tiny_model_dir, tmp_path / "peft", [4], seed=1)
    release = threading.Event()
    inside: list[int] = []  # a token per read under way
    overlapped: list[int] = []

    def spec(model_dir: Path) -> BaseModelSpec:
        inside.append(1)
        if len(inside) > 1:
            overlapped.append(1)
        try:
            release.wait(60)  # the first read (at start) is slow
            return base_model_spec(model_dir)
        finally:
            inside.pop()

    monkeypatch.setattr(gateway_adapters, "base_model_spec", spec)
    monkeypatch.setattr(gateway_module, "_WARM_UP_LIMIT_S", 0.2)
    cfg = inprocess_config(tmp_path / "run", valkey_url, model=str(tiny_model_dir)).replace(
        "storage", local_dir=str(tmp_path / "objects")
    )
    try:
        with ClusterState(valkey_url) as state, trio.fail_after(120):
            _, key = state.tenants.create("uploader")
            async with trio.open_nursery() as nursery:
                gateway = Gateway(cfg, state)
                address = await nursery.start(gateway.run)
                await wait_until(lambda: bool(inside))  # started while the read goes on
                async with AsyncClient(address, key, timeout_s=60) as c:
                    pushed: list[int] = []

                    async def push() -> None:
                        pushed.append((await c.push_adapter(adapter, "slow")).version)

                    nursery.start_soon(push)
                    # The upload is validating: it must wait for the start's read.
                    await wait_until(lambda: gateway.adapters.validate_limiter.borrowed_tokens > 0)
                    await trio.sleep(0.5)
                    release.set()
                    await wait_until(lambda: bool(pushed))
                assert pushed == [1] and not overlapped
                nursery.cancel_scope.cancel()
    finally:
        release.set()
