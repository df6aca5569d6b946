"""Training jobs on a real tiny-model executor, in-process: scheduler, ledger, gateway and
executor actors on ipc sockets, a real Valkey, the local object store.

Test rules: loopback and ipc only; every test under ``trio.fail_after``; one CPU thread for
torch; no timing assertions (latency figures come from ``vajra bench train``).

The memorisation threshold: 20 prompt/completion pairs, rank 16 on every projection, lr 5e-3,
batch 4, 40 epochs (200 optimizer steps); the final loss must fall below 0.5 (it ends near
0.2 on the tiny model) and greedy decoding must reproduce every completion.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import trio
from safetensors.torch import load

from tests.gpu.training_kit import jsonl, pairs
from tests.inprocess import inprocess_config
from vajra.actors.base import wait_until
from vajra.actors.executor import Executor
from vajra.actors.gateway import Gateway
from vajra.actors.ledger import Ledger
from vajra.actors.scheduler import Scheduler
from vajra.client import AsyncClient, UnavailableError
from vajra.config import VajraConfig
from vajra.gpu.training.checkpoint import _metadata
from vajra.policies.training import TrainParams
from vajra.state import ClusterState
from vajra.state.jobs import JobRecord, new_job_id
from vajra.storage import get_adapter_objects, open_store
from vajra.training.dataset import dataset_digest

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MEMORISE = TrainParams(
    epochs=40,
    learning_rate=5e-3,
    batch_size=4,
    rank=16,
    alpha=32.0,
    target_modules=ALL,
    checkpoint_every=50,
)
WARM_UP = TrainParams(
    epochs=2,
    learning_rate=5e-3,
    batch_size=4,
    rank=16,
    alpha=32.0,
    target_modules=ALL,
    checkpoint_every=0,
)
LOSS_THRESHOLD = 0.5
LIMIT_S = 240


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cfg(tmp_path: Path, valkey_url: str, tiny_model_dir: Path) -> VajraConfig:
    base = inprocess_config(tmp_path / "run", valkey_url, model=str(tiny_model_dir))
    return (
        base.replace("cluster", home=str(tmp_path / "home"))
        .replace("storage", local_dir=str(tmp_path / "objects"))
        .replace("scheduler", executor_timeout_s=5.0)
        .replace(
            "executor",
            device="cpu",
            torch_threads=1,
            max_batch_size=8,
            max_model_len=256,
            usage_resend_s=0.3,
            drain_timeout_s=1.0,
        )
        .replace("training", lease_ms=1500, expire_interval_s=0.3, placement_wait_s=0.2)
    )


@pytest.fixture
def state(valkey_url: str, raw: redis.Redis[str]) -> Iterator[ClusterState]:
    with ClusterState(valkey_url) as s:
        yield s


async def start_executor(
    nursery: trio.Nursery, cfg: VajraConfig, state: ClusterState, executor_id: str
) -> tuple[Executor, trio.CancelScope]:
    """A tiny-model executor and the scope that stops it dead (as if its process died: its
    jobs are not finished, their leases just stop being renewed)."""
    executor = Executor(cfg, state, executor_id=executor_id, model=cfg.cluster.model)
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await executor.run(task_status=task_status)

    await nursery.start(run)
    return executor, scope


@asynccontextmanager
async def cluster(
    cfg: VajraConfig, state: ClusterState, *, executor_id: str = "exec-0"
) -> AsyncIterator[tuple[str, Executor, trio.Nursery, trio.CancelScope]]:
    """Scheduler, ledger, gateway and one tiny-model executor: yields the gateway's address,
    the executor, the nursery and the scope that stops the executor dead."""
    async with trio.open_nursery() as nursery:
        await nursery.start(Scheduler(cfg).run)
        await nursery.start(Ledger(cfg, state).run)
        executor, scope = await start_executor(nursery, cfg, state, executor_id)
        address = await nursery.start(Gateway(cfg, state).run)
        yield address, executor, nursery, scope
        nursery.cancel_scope.cancel()


async def ready(c: AsyncClient) -> None:
    for _ in range(100):
        try:
            await c.infer("hello", max_tokens=1)
            return
        except UnavailableError:  # the executor's hello may still be on its way
            await trio.sleep(0.1)


def submit(
    state: ClusterState,
    cfg: VajraConfig,
    tenant_id: str,
    adapter: str,
    rows: list[dict[str, Any]],
    params: TrainParams,
    *,
    from_version: int | None = None,
    raw: bytes | None = None,
) -> JobRecord:
    """A queued job, as the gateway stores one (dataset in the object store); ``raw``: these
    bytes as the dataset instead of ``rows``."""
    data = jsonl(rows) if raw is None else raw
    digest = dataset_digest(data)
    key = f"datasets/{tenant_id}/{digest.split(':')[1]}.jsonl"
    open_store(cfg).put(key, data)
    rec = JobRecord(
        job_id=new_job_id(),
        tenant_id=tenant_id,
        adapter=adapter,
        base_model=Path(cfg.cluster.model).name,
        from_version=from_version,
        params=params.to_dict(),
        dataset_key=key,
        dataset_digest=digest,
    )
    return state.jobs.create(rec)


async def until_status(
    state: ClusterState, rec: JobRecord, statuses: set[str], *, step: int = 0
) -> JobRecord:
    while True:
        now = state.jobs.get(rec.tenant_id, rec.job_id)
        if now.status in statuses and now.step >= step:
            return now
        await trio.sleep(0.05)


async def answers(c: AsyncClient, prompts: list[str], adapter: str) -> list[str]:
    out = []
    for p in prompts:
        r = await c.infer(p, adapter=adapter, max_tokens=16, temperature=0.0)
        out.append(r.text)
    return out


def _tenant(state: ClusterState) -> tuple[str, str]:
    t, key = state.tenants.create(f"t{uuid.uuid4().hex[:8]}")
    return t.tenant_id, key


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_memorisation_swaps_in_and_keeps_the_previous_version_answering(
    cfg: VajraConfig, state: ClusterState, tiny_model_dir: Path, tmp_path: Path
) -> None:
    tenant_id, key = _tenant(state)
    rows = pairs(20)
    prompts = [r["prompt"] for r in rows]
    with trio.fail_after(LIMIT_S):
        async with cluster(cfg, state) as (address, executor, _n, _s):
            async with AsyncClient(address, key, timeout_s=30) as c:
                await ready(c)
                # Version 1: a fresh adapter, briefly trained on other pairs.
                first = submit(state, cfg, tenant_id, "mem", pairs(20, seed=7), WARM_UP)
                first = await until_status(state, first, {"succeeded", "failed", "cancelled"})
                assert first.status == "succeeded" and first.result_version == 1, first.error
                v1 = state.adapters.get(tenant_id, "mem", 1)
                assert v1.active and v1.parent_version is None and v1.rank == WARM_UP.rank
                before = await answers(c, prompts, "mem")
                assert before != [r["completion"] for r in rows]
                rec = submit(state, cfg, tenant_id, "mem", rows, MEMORISE, from_version=1)
                running = await until_status(state, rec, {"running"}, step=1)
                assert running.executor_id == "exec-0"
                # Inference keeps flowing while the job trains: no failures.
                during = await answers(c, prompts[:4], "mem@1")
                assert during == before[:4]
                done = await until_status(state, rec, {"succeeded", "failed", "cancelled"})
                assert done.status == "succeeded", done.error
                assert done.result_version == 2 and done.step == 200 and done.loss < LOSS_THRESHOLD
                # About every 50 steps, named by the step it holds (the model thread may be
                # past the report that asked for it); none after the last.
                assert 150 <= done.checkpoint_step < 200
                v2 = state.adapters.get(tenant_id, "mem", 2)
                assert v2.active and v2.parent_version == 1 and v2.source == "train"
                assert v2.dataset_digest == rec.dataset_digest
                assert v2.hyperparams["learning_rate"] == MEMORISE.learning_rate
                assert v2.metrics["final_loss"] < LOSS_THRESHOLD
                # After the swap the adapter reproduces the trained completions...
                after = await answers(c, prompts, "mem")
                assert after == [r["completion"] for r in rows]
                # ...the previous version answers exactly as before...
                assert await answers(c, prompts, "mem@1") == before
                # ...and a rollback makes the name answer as before again.
                await c.rollback("mem", 1)
                assert await answers(c, prompts, "mem") == before
            # Each optimizer step billed once: gradients = trainable parameters x steps.
            _config, weights = get_adapter_objects(open_store(cfg), v2.object_key)
            trainable = sum(t.numel() for t in load(weights).values())
            steps = 200 + first.step  # both jobs (the same modules and rank)
            await wait_until(lambda: state.usage.get(tenant_id).gradients >= trainable * steps)
            await trio.sleep(0.5)  # resends would show up now
            assert state.usage.get(tenant_id).gradients == trainable * steps
            assert executor.jobs is not None and not executor.jobs.jobs
            assert executor.steps is not None and not executor.steps.model.training_jobs()


async def test_the_last_steps_report_is_never_dropped(
    cfg: VajraConfig, state: ClusterState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer counts its last step as done before the report reaches the model thread's
    lock. Widen that gap: the job must still record (and bill) every step."""
    import time

    from vajra.gpu.training import LoraTrainer

    original = LoraTrainer.micro_step

    def slow_last(self: LoraTrainer) -> object:
        report = original(self)
        if report is not None and self.finished:
            time.sleep(0.5)  # finished, its report not yet handed over
        return report

    monkeypatch.setattr(LoraTrainer, "micro_step", slow_last)
    from vajra.actors.executor_job_steps import StepBook

    on_report = StepBook._on_report

    async def slow_second(self: StepBook, job: Any, report: Any) -> None:
        await on_report(self, job, report)
        if int(report.step) == 2:  # meanwhile the last step finishes, its report held back
            await trio.sleep(0.3)

    monkeypatch.setattr(StepBook, "_on_report", slow_second)
    tenant_id, _key = _tenant(state)
    params = TrainParams(epochs=3, learning_rate=1e-3, batch_size=8, checkpoint_every=0)
    with trio.fail_after(LIMIT_S):
        async with cluster(cfg, state) as (_a, _executor, _n, _s):
            rec = submit(state, cfg, tenant_id, "fresh", pairs(8), params)
            done = await until_status(state, rec, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert done.step == done.total_steps == 3
    assert done.gradients == 3 * (done.gradients // 3) > 0


async def test_cancel_mid_run_stops_the_job(cfg: VajraConfig, state: ClusterState) -> None:
    tenant_id, key = _tenant(state)
    long = TrainParams(epochs=1000, learning_rate=1e-3, batch_size=2, checkpoint_every=5)
    with trio.fail_after(LIMIT_S):
        async with cluster(cfg, state) as (address, executor, _n, _s):
            rec = submit(state, cfg, tenant_id, "fresh", pairs(8), long)
            await until_status(state, rec, {"running"}, step=6)
            state.jobs.request_cancel(tenant_id, rec.job_id)
            done = await until_status(state, rec, {"cancelled", "failed", "succeeded"})
            assert done.status == "cancelled"
            assert done.checkpoint_key.startswith(f"checkpoints/{tenant_id}/{rec.job_id}/")
            assert open_store(cfg).exists(done.checkpoint_key)
            # The record names the step the checkpoint holds.
            held = _metadata(open_store(cfg).get(done.checkpoint_key))["step"]
            assert int(held) == done.checkpoint_step >= 5
            assert done.checkpoint_key.endswith(f"/{held}.safetensors")
            assert executor.jobs is not None
            await wait_until(lambda: not executor.jobs.jobs)  # type: ignore[union-attr]
            assert executor.steps is not None and not executor.steps.model.training_jobs()
            # The executor goes on serving.
            async with AsyncClient(address, key, timeout_s=30) as c:
                await ready(c)
                assert len((await c.infer("hello", max_tokens=2)).tokens) >= 1
            assert state.adapters.list(tenant_id) == []  # nothing registered


async def test_deleting_the_tenant_mid_job_stops_it_and_removes_its_checkpoints(
    cfg: VajraConfig, state: ClusterState
) -> None:
    tenant_id, _key = _tenant(state)
    other_id, _ = _tenant(state)
    long = TrainParams(epochs=1000, learning_rate=1e-3, batch_size=2, checkpoint_every=3)
    store = open_store(cfg)
    with trio.fail_after(LIMIT_S):
        async with cluster(cfg, state) as (_address, executor, _n, _s):
            rec = submit(state, cfg, tenant_id, "fresh", pairs(8), long)
            await until_status(state, rec, {"running"}, step=4)
            # Step 3's report can be recorded before its checkpoint is stored: wait for the
            # record to name one (a fresh-clone CI run listed the folder in between).
            await wait_until(lambda: state.jobs.get(tenant_id, rec.job_id).checkpoint_step >= 3)
            assert store.list_keys(f"checkpoints/{tenant_id}/{rec.job_id}/")
            bystander = submit(state, cfg, other_id, "theirs", pairs(4), WARM_UP)
            assert state.tenants.delete(tenant_id) is not None  # what the gateway's delete does
            assert executor.jobs is not None
            # The runner learns at its next renewal (a third of the lease): the job stops,
            # records nothing (there is no record) and removes the checkpoints it stored.
            await wait_until(lambda: rec.job_id not in executor.jobs.jobs)  # type: ignore[union-attr]
            assert store.list_keys(f"checkpoints/{tenant_id}/") == []
            assert state.adapters.list(tenant_id) == []
            # Another tenant's job on the same executor is untouched and completes.
            done = await until_status(state, bystander, {"succeeded", "failed", "cancelled"})
            assert done.status == "succeeded", done.error
            assert store.list_keys(f"datasets/{other_id}/")


async def test_a_lost_executor_fails_the_job_and_resume_continues_from_its_checkpoint(
    cfg: VajraConfig, state: ClusterState
) -> None:
    tenant_id, _key = _tenant(state)
    params = TrainParams(epochs=30, learning_rate=1e-3, batch_size=2, checkpoint_every=10)
    with trio.fail_after(LIMIT_S):
        async with cluster(cfg, state, executor_id="exec-a") as (_a, first, nursery, kill):
            rec = submit(state, cfg, tenant_id, "fresh", pairs(8), params)
            await until_status(state, rec, {"running"}, step=12)
            await wait_until(lambda: state.jobs.get(tenant_id, rec.job_id).checkpoint_step >= 10)
            # The executor stops dead mid-job: nothing finishes the job; its lease passes and
            # the gateway marks it failed, keeping its checkpoint.
            assert first.jobs is not None and list(first.jobs.jobs) == [rec.job_id]
            kill.cancel()
            failed = await until_status(state, rec, {"failed"})
            assert failed.error == "executor lost" and failed.checkpoint_step >= 10
            resumed = state.jobs.resume(tenant_id, rec.job_id)
            assert resumed.status == "queued" and resumed.attempt == 2
            await start_executor(nursery, cfg, state, "exec-b")
            done = await until_status(state, rec, {"succeeded", "failed", "cancelled"})
            assert done.status == "succeeded", done.error
            assert done.executor_id == "exec-b" and done.step == 120
            # Steps redone after the resume are counted once, as they are billed.
            assert done.gradients == failed.gradients // failed.step * 120
            assert state.adapters.get(tenant_id, "fresh").version == done.result_version


async def test_a_draining_executor_hands_its_job_back_and_another_continues_it(
    cfg: VajraConfig, state: ClusterState
) -> None:
    tenant_id, key = _tenant(state)
    # No claim without an offer here: the job must reach each executor through placement
    # (submitted through the gateway, handed back by the draining executor).
    cfg = cfg.replace("training", placement_wait_s=3600.0)
    with trio.fail_after(LIMIT_S):
        async with cluster(cfg, state, executor_id="exec-a") as (address, first, nursery, kill):
            async with AsyncClient(address, key, timeout_s=60) as c:
                job = await c.train(
                    "fresh",
                    jsonl(pairs(8)),
                    epochs=30,
                    learning_rate=1e-3,
                    batch_size=2,
                    checkpoint_every=50,
                    fresh=True,
                )
            rec = state.jobs.get(tenant_id, job.job_id)
            mid = await until_status(state, rec, {"running"}, step=7)
            assert mid.checkpoint_step == 0  # no periodic checkpoint yet (every 50 steps)
            await first.drain()  # what SIGTERM does
            back = state.jobs.get(tenant_id, rec.job_id)
            assert back.status == "queued" and back.attempt == 2, back
            # Checkpointed where it stood, and every step up to it recorded (and billed).
            assert back.checkpoint_step == back.step >= 7
            assert open_store(cfg).exists(back.checkpoint_key)
            assert first.jobs is not None and not first.jobs.jobs
            kill.cancel()
            await start_executor(nursery, cfg, state, "exec-b")
            done = await until_status(state, rec, {"succeeded", "failed", "cancelled"})
            assert done.status == "succeeded", done.error
            assert done.executor_id == "exec-b" and done.step == 120 and done.attempt == 2
            assert done.gradients == back.gradients // back.step * 120


@pytest.fixture(scope="module")
def larger_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer on a wider, deeper random Llama (about 58 MB of float32
    weights), so that a copy of the base would stand out of the process's memory noise."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("larger") / "larger-llama"
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 512, 1536, 4
    config.num_attention_heads = config.num_key_value_heads = 8
    config.head_dim = 64
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    return out


async def test_training_does_not_copy_the_base_model(
    cfg: VajraConfig, state: ClusterState, larger_model_dir: Path
) -> None:
    cfg = cfg.replace("cluster", model=str(larger_model_dir))
    tenant_id, key = _tenant(state)
    params = TrainParams(epochs=1000, learning_rate=1e-3, batch_size=2, checkpoint_every=0)
    with trio.fail_after(LIMIT_S):
        async with cluster(cfg, state) as (address, executor, _n, _s):
            async with AsyncClient(address, key, timeout_s=30) as c:
                await ready(c)  # every weight read once (they are mapped from the file)
            model: Any = executor.engine.model  # type: ignore[union-attr]
            weights = {name: p.data_ptr() for name, p in model.named_parameters()}
            model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            assert model_bytes > 50e6
            rss_before = _rss_bytes()
            rec = submit(state, cfg, tenant_id, "fresh", pairs(8), params)
            await until_status(state, rec, {"running"}, step=3)
            grown = _rss_bytes() - rss_before
            # A copy of the base would add model_bytes; the job adds LoRA weights, their
            # AdamW state and one micro-step's activations.
            assert grown < model_bytes / 2, (grown, model_bytes)
            assert {name: p.data_ptr() for name, p in model.named_parameters()} == weights
            assert not any(p.requires_grad for p in model.parameters())
            state.jobs.request_cancel(tenant_id, rec.job_id)
            assert (await until_status(state, rec, {"cancelled"})).status == "cancelled"


async def test_bad_jobs_fail_naming_the_problem_and_the_executor_goes_on(
    cfg: VajraConfig, state: ClusterState
) -> None:
    """The gateway refuses these before a job exists; an executor must not trust the record."""
    tenant_id, key = _tenant(state)
    other_id, _ = _tenant(state)
    store = open_store(cfg)
    quick = TrainParams(epochs=1, batch_size=2, checkpoint_every=0)
    with trio.fail_after(LIMIT_S):
        async with cluster(cfg, state) as (address, _executor, _n, _s):
            csv = b"prompt,completion\nhi,there\n"
            not_jsonl = submit(state, cfg, tenant_id, "a", [], quick, raw=csv)
            tampered = submit(state, cfg, tenant_id, "b", pairs(3), quick)
            store.put(tampered.dataset_key, jsonl(pairs(4)))
            # An adapter version of another tenant: not found, exactly like a missing one.
            theirs = submit(state, cfg, other_id, "shared", pairs(2), quick)
            assert (await until_status(state, theirs, {"succeeded"})).result_version == 1
            foreign = submit(state, cfg, tenant_id, "shared", pairs(2), quick, from_version=1)
            missing_data = submit(state, cfg, tenant_id, "c", pairs(2), quick)
            store.delete(missing_data.dataset_key)
            ended = {"succeeded", "failed", "cancelled"}
            for rec, words in (
                (not_jsonl, "line 1"),
                (tampered, "digest"),
                (foreign, "not found"),
                (missing_data, "not found"),
            ):
                done = await until_status(state, rec, ended)
                assert done.status == "failed" and words in done.error, (words, done.error)
                assert done.result_version is None
            assert [v.name for v in state.adapters.list(tenant_id)] == []
            ok = await until_status(
                state, submit(state, cfg, tenant_id, "d", pairs(2), quick), ended
            )
            assert ok.status == "succeeded", ok.error
            async with AsyncClient(address, key, timeout_s=30) as c:
                assert (await c.infer("hello", adapter="d", max_tokens=2)).tokens
