"""Adapter push, list, delete and request-path resolution through a real in-process gateway.

Rules: real Valkey and a real object store (a temp directory), real PEFT adapters saved by
``PeftModel.save_pretrained`` on the tiny model; the scheduler is played by a raw ROUTER so
the ``InferWork`` the gateway sends can be inspected; every test under ``trio.fail_after``.
Every refused upload must name its problem and leave the object store and Redis untouched.
"""

from __future__ import annotations

import json
import pickle
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import trio
import zmq
from peft import LoraConfig, get_peft_model
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM

from tests.storage.conftest import s3_store
from tests.storage.seaweed import SeaweedS3, seaweed
from vajra.actors.gateway import Gateway
from vajra.bus.codec import DecodeError, decode, decode_many, encode
from vajra.bus.messages import (
    AdapterPush,
    AdapterSwap,
    AdapterSwapDone,
    InferResult,
    InferWork,
)
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.client import (
    AsyncClient,
    InvalidRequest,
    NotFoundError,
    PayloadTooLarge,
    QuotaExceeded,
)
from vajra.client._adapter_files import read_adapter_dir
from vajra.config import VajraConfig
from vajra.state import ClusterState
from vajra.storage import LocalObjectStore

MAX_ADAPTER_BYTES = 2_000_000


def save_peft(model_dir: Path, out: Path, seed: int, **lora: Any) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(out)
    return out


@dataclass
class Adapters:
    v1: Path
    v2: Path
    rank16: Path


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    root = tmp_path_factory.mktemp("peft")
    return Adapters(
        v1=save_peft(
            tiny_model_dir, root / "v1", 1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
        ),
        v2=save_peft(tiny_model_dir, root / "v2", 2, r=4, lora_alpha=8, target_modules=["o_proj"]),
        rank16=save_peft(
            tiny_model_dir, root / "r16", 3, r=16, lora_alpha=16, target_modules=["q_proj"]
        ),
    )


@pytest.fixture
def cfg(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    valkey_url: str,
    tiny_model_dir: Path,
    raw: redis.Redis[str],
) -> VajraConfig:
    """The test config; a test may set more ``[adapters]`` keys with indirect parametrizing."""
    adapters: dict[str, int] = getattr(request, "param", {})
    run = tmp_path / "run"
    run.mkdir()
    return (
        VajraConfig()
        .replace(
            "cluster",
            home=str(tmp_path),
            redis_url=valkey_url,
            model=str(tiny_model_dir),
            gateway_address="tcp://127.0.0.1:0",
            gateway_backend_address=f"ipc://{run}/gw",
            scheduler_address=f"ipc://{run}/sched",
        )
        .replace("adapters", max_rank=8, max_adapter_bytes=MAX_ADAPTER_BYTES, **adapters)
        .replace("storage", local_dir=str(tmp_path / "objects"))
    )


@pytest.fixture
def state(valkey_url: str, raw: redis.Redis[str]) -> Iterator[ClusterState]:
    with ClusterState(valkey_url) as s:
        yield s


def new_tenant(valkey_url: str) -> str:
    with ClusterState(valkey_url) as s:
        _, key = s.tenants.create(f"t{uuid.uuid4().hex[:8]}")
    return key


class Cluster:
    """A gateway with a fake scheduler that answers every InferWork and records it, and
    answers each warm-up of a hot swap at once (no executor holds the old version)."""

    def __init__(self, gateway: Gateway, address: str, sched: ZSocket) -> None:
        self.gateway, self.address, self.sched = gateway, address, sched
        self.work: list[InferWork] = []

    async def serve_scheduler(self) -> None:
        while True:
            identity, *frames = await self.sched.recv()
            for env, _ in decode_many(frames):  # the gateway may send several at once
                assert not isinstance(env, DecodeError), env
                work = env.message
                if isinstance(work, AdapterSwap):
                    done = AdapterSwapDone(work.swap_id, ok=True)
                    await self.sched.send([identity, *encode(done)])
                    continue
                if not isinstance(work, InferWork):  # announcements (a GatewayHello): no reply
                    continue
                self.work.append(work)
                result = InferResult(work.request_id, "ok", [1], "stop", 1, 1, 0.1)
                await self.sched.send([identity, *encode(result)])


@pytest.fixture
async def cluster(cfg: VajraConfig, state: ClusterState) -> AsyncIterator[Cluster]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sched = open_socket(ctx, zmq.ROUTER)
    sched.bind(cfg.cluster.scheduler_address)
    async with trio.open_nursery() as nursery:
        gateway = Gateway(cfg, state)
        address = await nursery.start(gateway.run)
        c = Cluster(gateway, address, sched)
        nursery.start_soon(c.serve_scheduler)
        yield c
        nursery.cancel_scope.cancel()
    sched.close()
    ctx.destroy(linger=0)


def stored(cfg: VajraConfig, raw: redis.Redis[str]) -> tuple[list[str], list[str]]:
    """Everything in the object store and under the registry's Redis prefix."""
    return LocalObjectStore(cfg.storage.local_dir).list_keys(), sorted(raw.keys("vajra:adapter:*"))


def write_adapter(dirpath: Path, config: bytes, weights: bytes) -> Path:
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "adapter_config.json").write_bytes(config)
    (dirpath / "adapter_model.safetensors").write_bytes(weights)
    return dirpath


async def test_push_versions_resolution_and_delete(
    cluster: Cluster, cfg: VajraConfig, raw: redis.Redis[str], valkey_url: str, adapters: Adapters
) -> None:
    key = new_tenant(valkey_url)
    with trio.fail_after(60):
        async with AsyncClient(cluster.address, key, timeout_s=30) as c:
            a1 = await c.push_adapter(adapters.v1, "chat")
            assert (a1.name, a1.version, a1.rank, a1.active) == ("chat", 1, 8, True)
            a2 = await c.push_adapter(adapters.v2 / "adapter_config.json", "chat")
            assert (a2.version, a2.rank) == (2, 4) and a2.digest != a1.digest
            listed = await c.list_adapters()
            assert [(a.version, a.active) for a in listed] == [(1, False), (2, True)]
            assert listed[0].target_modules == ("q_proj", "v_proj")
            objects, _ = stored(cfg, raw)
            assert len(objects) == 4 and all(k.startswith("adapters/") for k in objects)
            config, weights = read_adapter_dir(adapters.v2)
            store = LocalObjectStore(cfg.storage.local_dir)
            prefix = next(k for k in objects if a2.digest in k).rsplit("/", 1)[0]
            assert store.get(f"{prefix}/adapter_model.safetensors") == weights
            assert store.get(f"{prefix}/adapter_config.json") == config

            # Requests carry exactly the version resolved at admission.
            await c.infer("hi", adapter="chat")
            await c.infer("hi", adapter="chat@1")
            await c.infer("hi")
            w_active, w_pinned, w_base = cluster.work[-3:]
            assert (w_active.adapter, w_active.adapter_version, w_active.adapter_digest) == (
                "chat",
                2,
                a2.digest,
            )
            assert w_active.adapter_object_key is not None
            assert w_active.adapter_object_key.endswith(a2.digest)
            assert (w_pinned.adapter_version, w_pinned.adapter_digest) == (1, a1.digest)
            assert w_base.adapter_version is None and w_base.adapter_digest is None
            for ref in ("nope", "chat@3"):
                with pytest.raises(NotFoundError) as nf:
                    await c.infer("hi", adapter=ref)
                assert (
                    nf.value.field == "adapter" and nf.value.message == f"adapter {ref!r} not found"
                )
            with pytest.raises(InvalidRequest):
                await c.infer("hi", adapter="chat@x")

            # Deleting the active version: the gateway resolves the name to version 1 at once.
            gone = await c.delete_adapter("chat@2")
            assert [g.version for g in gone] == [2]
            await c.infer("hi", adapter="chat")
            assert cluster.work[-1].adapter_version == 1
            with pytest.raises(NotFoundError):
                await c.infer("hi", adapter="chat@2")
            assert len(stored(cfg, raw)[0]) == 2  # v2's files are freed
            # Pushing again continues the numbering; deleting the name frees everything.
            assert (await c.push_adapter(adapters.v2, "chat")).version == 3
            await c.delete_adapter("chat")
            assert await c.list_adapters() == []
            assert stored(cfg, raw) == ([], [])
            with pytest.raises(NotFoundError):
                await c.delete_adapter("chat")


async def test_bad_adapters_are_refused_and_nothing_is_stored(
    cluster: Cluster,
    cfg: VajraConfig,
    raw: redis.Redis[str],
    valkey_url: str,
    adapters: Adapters,
    tmp_path: Path,
) -> None:
    key = new_tenant(valkey_url)
    config, weights = read_adapter_dir(adapters.v1)
    tensors = load_safetensors(weights)
    a_key = next(k for k in tensors if "lora_A" in k)
    wrong = dict(tensors)
    wrong[a_key] = torch.zeros(tensors[a_key].shape[0], tensors[a_key].shape[1] + 1)
    missing = json.loads(config)
    missing["target_modules"] = ["q_proj", "v_proj", "nonexistent_proj"]
    r16_config, r16_weights = read_adapter_dir(adapters.rank16)
    cases: dict[str, tuple[bytes, bytes, str]] = {
        "pickle": (config, pickle.dumps({a_key: [0.0] * 16}), "pickle"),
        "torch-pickle": (config, _torch_save(tensors), "pickle"),
        "wrong-shapes": (config, save_safetensors(wrong), "do not match the base layer"),
        "rank-over-limit": (r16_config, r16_weights, "the limit is 8"),
        "truncated": (config, weights[: len(weights) // 2], "truncated"),
        "missing-modules": (json.dumps(missing).encode(), weights, "nonexistent_proj"),
        "not-json": (b"{not json", weights, "not JSON"),
    }
    before = stored(cfg, raw)
    assert before == ([], [])
    with trio.fail_after(60):
        async with AsyncClient(cluster.address, key, timeout_s=30) as c:
            for case, (cfg_bytes, w_bytes, words) in cases.items():
                with pytest.raises(InvalidRequest) as refused:
                    await c.push_adapter(write_adapter(tmp_path / case, cfg_bytes, w_bytes), "chat")
                assert words in refused.value.message, (case, refused.value.message)
                assert refused.value.field == "adapter", case
                assert stored(cfg, raw) == before, case
            # Oversized: refused by size before validation, with the size named. The client
            # knows the gateway's limit and refuses before sending, at once, even far past
            # the size at which ZeroMQ would cut the connection (no timeout).
            big = write_adapter(tmp_path / "big", config, weights + b"\0" * MAX_ADAPTER_BYTES)
            huge = write_adapter(tmp_path / "huge", config, b"\0" * (4 * MAX_ADAPTER_BYTES))
            for path in (big, huge):
                with trio.fail_after(5), pytest.raises(PayloadTooLarge) as too_big:
                    await c.push_adapter(path, "chat")
                assert f"accepts at most {MAX_ADAPTER_BYTES}" in too_big.value.message
                assert too_big.value.field == "weights"
            # A client that was told no limit sends it: the gateway refuses it just the same.
            c._max_upload_bytes = 0
            with pytest.raises(PayloadTooLarge) as too_big:
                await c.push_adapter(big, "chat")
            assert f"limit of {MAX_ADAPTER_BYTES}" in too_big.value.message
            assert stored(cfg, raw) == before
            # Pickle-only directories never leave the client.
            only_bin = tmp_path / "bin"
            only_bin.mkdir()
            (only_bin / "adapter_config.json").write_bytes(config)
            (only_bin / "adapter_model.bin").write_bytes(b"\x80\x04junk")
            with pytest.raises(InvalidRequest, match="only safetensors"):
                await c.push_adapter(only_bin, "chat")
            for name in ("", "bad name", "x" * 65, "a/b"):
                with pytest.raises(InvalidRequest) as bad_name:
                    await c.push_adapter(adapters.v1, name)
                assert bad_name.value.field == "name"
            assert stored(cfg, raw) == before
            assert await c.list_adapters() == []
            # A valid push still works afterwards.
            assert (await c.push_adapter(adapters.v1, "chat")).version == 1


async def test_hostile_uploads_are_refused_at_once_while_other_tenants_are_served(
    cluster: Cluster,
    cfg: VajraConfig,
    raw: redis.Redis[str],
    valkey_url: str,
    adapters: Adapters,
) -> None:
    """Catastrophic regexes, 50,000-deep JSON and NaN weights: each upload is refused within a
    second, the gateway stays up, and another tenant's requests keep their latency meanwhile
    (Python's ``re`` on "(.+)+X" held the GIL for minutes; deep JSON ended the gateway)."""
    attacker, victim = new_tenant(valkey_url), new_tenant(valkey_url)
    config, weights = read_adapter_dir(adapters.v1)  # q_proj and v_proj, r=8
    tensors = load_safetensors(weights)
    b_key = next(k for k in tensors if "lora_B" in k)
    nan = dict(tensors)
    nan[b_key] = tensors[b_key].clone()
    nan[b_key][1, 2] = float("nan")
    deep = b"[" * 50_000 + b"]" * 50_000

    def edited(**changes: Any) -> bytes:
        return json.dumps({**json.loads(config), **changes}).encode()

    def header_of(body: bytes) -> bytes:
        return len(body).to_bytes(8, "little") + body

    hostile: dict[str, tuple[bytes, bytes, str]] = {
        "regex-target": (edited(target_modules="(.+)+X"), weights, "matches no module"),
        "regex-rank": (edited(rank_pattern={"(.+)+X": 2, "(.+)+_proj": 3}), weights, "says 3"),
        "regex-alpha": (edited(alpha_pattern={"(.+)+X": 1, "(.+)+_proj": "x"}), weights, "alpha"),
        "backreference": (edited(target_modules=r"(q)\1_proj"), weights, "linear time"),
        "deep-config": (deep, weights, "too deeply"),
        "deep-header": (config, header_of(b'{"t": ' + deep + b"}"), "too deeply"),
        "nan-weights": (config, save_safetensors(nan), b_key),
    }
    latencies: list[float] = []
    before = stored(cfg, raw)

    async def victim_traffic(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with AsyncClient(cluster.address, victim, timeout_s=30) as v:
            await v.infer("hi")  # connected and warm
            task_status.started()
            while True:
                t0 = time.perf_counter()
                await v.infer("hi")
                latencies.append(time.perf_counter() - t0)
                await trio.sleep(0.005)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(victim_traffic)
            async with AsyncClient(cluster.address, attacker, timeout_s=30) as a:
                for case, (cfg_bytes, w_bytes, words) in [*hostile.items()] * 3:
                    t0 = time.perf_counter()
                    with pytest.raises(InvalidRequest) as refused:
                        await a.push_adapter_bytes(cfg_bytes, w_bytes, "evil")
                    assert time.perf_counter() - t0 < 1.0, case
                    assert words in refused.value.message, (case, refused.value.message)
                    assert refused.value.field == "adapter", case
                assert stored(cfg, raw) == before
                assert (await a.push_adapter(adapters.v1, "fine")).version == 1  # still up
            nursery.cancel_scope.cancel()
    assert len(latencies) >= 3
    assert max(latencies) < 1.0, f"another tenant waited {max(latencies):.2f} s"


def _torch_save(tensors: dict[str, torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


async def test_tenants_cannot_see_use_or_delete_each_others_adapters(
    cluster: Cluster, valkey_url: str, adapters: Adapters
) -> None:
    key_a, key_b = new_tenant(valkey_url), new_tenant(valkey_url)
    with trio.fail_after(60):
        async with (
            AsyncClient(cluster.address, key_a, timeout_s=30) as a,
            AsyncClient(cluster.address, key_b, timeout_s=30) as b,
        ):
            mine = await a.push_adapter(adapters.v1, "secret")
            assert await b.list_adapters() == []
            for op in ("infer", "delete"):
                for ref in ("secret", "secret@1"):
                    answers = []
                    for candidate in (ref, ref.replace("secret", "absent")):
                        with pytest.raises(NotFoundError) as nf:
                            if op == "infer":
                                await b.infer("hi", adapter=candidate)
                            else:
                                await b.delete_adapter(candidate)
                        answers.append(
                            (
                                nf.value.code,
                                nf.value.field,
                                nf.value.message.replace("absent", "secret"),
                            )
                        )
                    assert answers[0] == answers[1]
            # B's own "secret" is independent of A's.
            theirs = await b.push_adapter(adapters.v2, "secret")
            assert theirs.version == 1
            await b.delete_adapter("secret")
            assert [x.digest for x in await a.list_adapters()] == [mine.digest]
            await a.infer("hi", adapter="secret")
            assert cluster.work[-1].adapter_digest == mine.digest


@pytest.mark.parametrize(
    "cfg", [{"max_adapters_per_tenant": 2, "max_versions_per_adapter": 2}], indirect=True
)
async def test_quotas_refuse_a_push_before_anything_is_stored(
    cluster: Cluster,
    cfg: VajraConfig,
    raw: redis.Redis[str],
    valkey_url: str,
    adapters: Adapters,
    tiny_model_dir: Path,
    tmp_path: Path,
) -> None:
    key = new_tenant(valkey_url)
    v3 = save_peft(tiny_model_dir, tmp_path / "v3", 4, r=2, lora_alpha=4, target_modules=["k_proj"])
    with trio.fail_after(60):
        async with AsyncClient(cluster.address, key, timeout_s=30) as c:
            await c.push_adapter(adapters.v1, "one")
            await c.push_adapter(adapters.v2, "one")
            await c.push_adapter(adapters.v1, "two")
            before = stored(cfg, raw)
            with pytest.raises(QuotaExceeded, match="already holds 2 versions") as full:
                await c.push_adapter(v3, "one")
            assert full.value.field == "name"
            with pytest.raises(QuotaExceeded, match="already holds 2 adapters"):
                await c.push_adapter(v3, "three")
            assert stored(cfg, raw) == before  # the refused files were never written
            await c.delete_adapter("one", 1)
            assert (await c.push_adapter(v3, "one")).version == 3


async def test_push_frames_are_checked_by_the_codec() -> None:
    frames = encode(AdapterPush("r1", "k", "n"), message_id="r1", bulk=[b"{}", b"w" * 10])
    env = decode(frames)
    assert env.bulk == (b"{}", b"w" * 10)

    with pytest.raises(DecodeError, match="expected 4 frames"):
        decode(frames[:3])
    with pytest.raises(DecodeError) as big:
        decode(frames, max_bulk_bytes=11)
    assert big.value.code.value == "payload_too_large" and big.value.request_id == "r1"
    with pytest.raises(ValueError):
        encode(AdapterPush("r1", "k", "n"))


async def test_cli_push_list_delete(
    cluster: Cluster,
    valkey_url: str,
    adapters: Adapters,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from vajra.cli import main

    key = new_tenant(valkey_url)
    common = ["--key", key, "--gateway", cluster.address, "--json"]
    with trio.fail_after(60):
        assert (
            await trio.to_thread.run_sync(
                main, ["adapter", "push", str(adapters.v1), "--name", "cli", *common]
            )
            == 0
        )
        pushed = json.loads(capsys.readouterr().out)
        assert pushed["version"] == 1 and pushed["name"] == "cli"
        assert await trio.to_thread.run_sync(main, ["adapter", "list", *common]) == 0
        assert [a["version"] for a in json.loads(capsys.readouterr().out)] == [1]
        assert await trio.to_thread.run_sync(main, ["adapter", "delete", "cli@1", *common]) == 0
        assert "deleted cli@1" in capsys.readouterr().out
        assert await trio.to_thread.run_sync(main, ["adapter", "delete", "cli", *common]) == 1
        assert "not found" in capsys.readouterr().err
    # Far past what ZeroMQ lets through: refused by the (sync) client at once, not timed out.
    config, _ = read_adapter_dir(adapters.v1)
    huge = write_adapter(tmp_path / "huge", config, b"\0" * (4 * MAX_ADAPTER_BYTES))
    with trio.fail_after(10):
        push = ["adapter", "push", str(huge), "--name", "cli", *common]
        assert await trio.to_thread.run_sync(main, push) == 1
    assert f"accepts at most {MAX_ADAPTER_BYTES}" in capsys.readouterr().err


__all__ = ["seaweed"]  # the S3 server fixture, used below


async def test_push_and_delete_through_s3(
    cfg: VajraConfig,
    state: ClusterState,
    seaweed: SeaweedS3,
    valkey_url: str,
    adapters: Adapters,
    tmp_path: Path,
) -> None:
    key = new_tenant(valkey_url)
    store = s3_store(seaweed)
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                gateway = Gateway(cfg, state, store=store)
                address = await nursery.start(gateway.run)
                async with AsyncClient(address, key, timeout_s=30) as c:
                    config, weights = read_adapter_dir(adapters.v1)
                    bad = write_adapter(tmp_path / "bad", config, weights[:100])
                    with pytest.raises(InvalidRequest):
                        await c.push_adapter(bad, "s3")
                    assert await store.alist_keys() == []
                    info = await c.push_adapter(adapters.v1, "s3")
                    keys = await store.alist_keys()
                    assert len(keys) == 2 and all(info.digest in k for k in keys)
                    assert (
                        await store.aget(next(k for k in keys if k.endswith(".safetensors")))
                        == weights
                    )
                    await c.delete_adapter("s3")
                    assert await store.alist_keys() == []
                nursery.cancel_scope.cancel()
    finally:
        store.close()
