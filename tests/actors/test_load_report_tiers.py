"""A real executor (tiny model, a PEFT adapter) reports residency per tier and measured load
times in its LoadReport: what live placement and prefetch read.

Test rules: ipc sockets in a temp dir, a real Valkey, a real tiny model and an adapter saved
by PEFT itself; every I/O step under ``trio.fail_after``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import trio
import zmq
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tests.actors.inbox import Inbox
from vajra.actors.base import now_ms
from vajra.actors.executor import Executor
from vajra.adapters.format import base_model_spec, validate_adapter
from vajra.bus.codec import decode, decode_many, encode
from vajra.bus.messages import (
    AdapterTierCommand,
    ExecutorHello,
    InferResult,
    InferWork,
    LoadReport,
    Sampling,
)
from vajra.bus.zsocket import ZSocket, open_socket
from vajra.config import VajraConfig
from vajra.state import ClusterState
from vajra.storage import LocalObjectStore, adapter_object_key, put_adapter_objects

TENANT = "t_report"


def _adapter(model_dir: Path, out: Path) -> tuple[bytes, bytes]:
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    get_peft_model(base, cfg).save_pretrained(out)
    return (
        (out / "adapter_config.json").read_bytes(),
        (out / "adapter_model.safetensors").read_bytes(),
    )


async def _next_report(dispatch: ZSocket, want: object) -> LoadReport:
    """The first LoadReport for which ``want(report)`` holds (other messages skipped)."""
    while True:
        frames = await dispatch.recv()
        for env, _ in decode_many(frames[1:]):
            msg = getattr(env, "message", None)
            if isinstance(msg, LoadReport) and want(msg):  # type: ignore[operator]
                return msg


async def test_load_report_carries_tiers_slots_and_load_times(
    tmp_path: Path, valkey_url: str, tiny_model_dir: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    cfg = (
        VajraConfig()
        .replace(
            "cluster",
            home=str(tmp_path / "home"),
            redis_url=valkey_url,
            model=str(tiny_model_dir),
            gateway_backend_address=f"ipc://{run}/gw",
            scheduler_dispatch_address=f"ipc://{run}/dispatch",
            ledger_address=f"ipc://{run}/ledger",
        )
        .replace("storage", local_dir=str(tmp_path / "objects"))
        .replace("adapters", max_vram_adapters=2, host_cache_bytes=1 << 22)
        .replace("executor", max_batch_size=4)
    )
    config, weights = _adapter(tiny_model_dir, tmp_path / "peft")
    manifest = validate_adapter(
        config, weights, base_model_spec(tiny_model_dir), max_rank=64, max_bytes=1 << 30
    )
    digest, key = manifest.digest, adapter_object_key(TENANT, manifest.digest)
    put_adapter_objects(LocalObjectStore(cfg.storage.local_dir), key, config, weights)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    state = ClusterState(valkey_url)
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                dispatch = open_socket(ctx, zmq.ROUTER, handover=True)
                dispatch.bind(cfg.cluster.scheduler_dispatch_address)
                replies = open_socket(ctx, zmq.ROUTER, handover=True)
                replies.bind(cfg.cluster.gateway_backend_address)
                executor = Executor(cfg, state, executor_id="exec-r")
                await nursery.start(executor.run)
                assert isinstance(decode((await dispatch.recv())[1:]).message, ExecutorHello)
                first = await _next_report(dispatch, lambda r: True)
                assert first.gpu_slots == 2 and first.gpu_slots_free == 2
                assert first.resident_adapters == [] and first.tier_load_ms == {}
                work = InferWork(
                    request_id="r1",
                    tenant_id=TENANT,
                    prompt="Once upon a time",
                    adapter="x",
                    sampling=Sampling(max_tokens=2),
                    stream=False,
                    deadline_unix_ms=now_ms() + 60_000,
                    gateway_id="gw",
                    adapter_version=1,
                    adapter_digest=digest,
                    adapter_object_key=key,
                )
                await dispatch.send([b"exec-r", *encode(work)])
                assert isinstance(await Inbox(replies, routed=True).next(), InferResult)
                # Loaded store -> disk -> host -> GPU: listed in every tier, each load timed.
                r = await _next_report(dispatch, lambda r: digest in r.resident_adapters)
                assert digest in r.host_adapters and digest in r.disk_adapters
                assert r.gpu_slots == 2 and r.gpu_slots_free == 1 and r.active_adapters == 0
                assert set(r.tier_load_ms) == {"gpu", "host", "disk"}
                assert all(ms > 0 for ms in r.tier_load_ms.values())
                # Demoted to the disk (the predictor's command): gone from GPU and host.
                demote = AdapterTierCommand("exec-r", digest, key, "host", "demote")
                await dispatch.send([b"exec-r", *encode(demote)])
                r = await _next_report(dispatch, lambda r: digest not in r.resident_adapters)
                assert digest not in r.host_adapters and digest in r.disk_adapters
                assert r.gpu_slots_free == 2
                nursery.cancel_scope.cancel()
    finally:
        state.close()
        ctx.destroy(linger=0)
