"""Training jobs at the gateway: submission checks, job reads, cancel, resume, progress streams.

Test rules: ipc and loopback only; every test under ``trio.fail_after``; a real gateway on the
real tiny model (its tokenizer counts tokens), real Valkey, a real object store (a temp
directory); no scheduler or executor, so a job stays queued unless a test plays the executor
through :class:`vajra.state.jobs.Jobs` (claim, progress, finish), as the executor does.
Every refused submission is checked to leave nothing queued and nothing stored.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.inprocess import inprocess_config
from vajra.actors.base import wait_until
from vajra.actors.gateway import Gateway
from vajra.bus.messages import TrainSubmit
from vajra.client import AsyncClient
from vajra.client._jobs_async import call as raw_call
from vajra.config import VajraConfig
from vajra.errors import (
    InvalidRequest,
    NotFoundError,
    PayloadTooLarge,
    QuotaExceeded,
    VajraError,
)
from vajra.state import ClusterState, keys

MAX_BYTES = 262_144
MAX_EXAMPLES = 100
CONTEXT = 64
PAIRS = [{"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(20)]
GOOD = "\n".join(json.dumps(p) for p in PAIRS).encode()


@dataclass
class Env:
    address: str
    state: ClusterState
    cfg: VajraConfig
    tenant: str
    key: str
    other_tenant: str
    other_key: str
    objects: Path
    gw: Gateway

    def datasets(self) -> list[Path]:
        root = self.objects / "datasets"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def nothing_queued(self) -> None:
        assert self.state.jobs.list(self.tenant) == []
        assert self.state.jobs.queued_count("tiny-llama") == 0
        assert self.datasets() == []


def _register(state: ClusterState, tenant: str, name: str, rank: int = 4) -> None:
    state.adapters.register(
        tenant,
        name,
        digest="a" * 64,
        object_key=f"adapters/{tenant}/{'a' * 64}",
        rank=rank,
        lora_alpha=8.0,
        target_modules=["q_proj", "v_proj"],
        size_bytes=100,
        base_model="tiny-llama",
    )


@asynccontextmanager
async def gateway(
    tmp_path: Path, valkey_url: str, model: Path, **training: Any
) -> AsyncIterator[Env]:
    objects = tmp_path / "objects"
    cfg = (
        inprocess_config(tmp_path / "run", valkey_url, model=str(model))
        .replace(
            "training",
            **{
                "max_dataset_bytes": MAX_BYTES,
                "max_examples": MAX_EXAMPLES,
                "max_jobs_per_tenant": 3,
                "expire_interval_s": 0.1,
                "progress_poll_s": 0.05,
                **training,
            },
        )
        .replace("executor", max_model_len=CONTEXT)
        .replace("storage", local_dir=str(objects))
    )
    with ClusterState(valkey_url) as state:
        t1, k1 = state.tenants.create("one")
        t2, k2 = state.tenants.create("two")
        _register(state, t1.tenant_id, "mine")
        _register(state, t2.tenant_id, "theirs")
        async with trio.open_nursery() as nursery:
            gw = Gateway(cfg, state)
            address = await nursery.start(gw.run)
            yield Env(address, state, cfg, t1.tenant_id, k1, t2.tenant_id, k2, objects, gw)
            nursery.cancel_scope.cancel()


async def test_submit_get_list_cancel_and_isolation(
    tmp_path: Path, valkey_url: str, raw: Any, tiny_model_dir: Path
) -> None:
    with trio.fail_after(120):
        async with (
            gateway(tmp_path, valkey_url, tiny_model_dir) as env,
            AsyncClient(env.address, env.key, timeout_s=60) as c,
            AsyncClient(env.address, env.other_key, timeout_s=30) as other,
        ):
            job = await c.train("mine", GOOD, epochs=2, learning_rate=1e-3, batch_size=4)
            info = job.last
            assert info is not None and info.status == "queued"
            assert info.from_version == 1 and info.adapter == "mine"
            assert info.params["rank"] == 4 and info.params["epochs"] == 2
            assert info.total_steps == 10  # 20 examples, 4 per step, 2 epochs
            assert info.dataset_digest.startswith("sha256:")
            [stored] = env.datasets()
            assert stored.read_bytes() == GOOD
            assert stored.relative_to(env.objects).parts[:2] == ("datasets", env.tenant)
            assert (await job.status()).status == "queued"
            assert [j.job_id for j in await c.jobs()] == [job.job_id]
            # Another tenant sees nothing of it, exactly as of a job that does not exist.
            with pytest.raises(NotFoundError) as theirs:
                await other.job(job.job_id).status()
            with pytest.raises(NotFoundError) as missing:
                await other.job("j_" + "0" * 32).status()
            assert theirs.value.message.replace(job.job_id, "J") == (
                missing.value.message.replace("j_" + "0" * 32, "J")
            )
            with pytest.raises(NotFoundError):
                await other.job(job.job_id).cancel()
            assert await other.jobs() == []
            cancelled = await job.cancel()
            assert cancelled.status == "cancelled"
            assert env.state.jobs.claim("ex-1", "tiny-llama", 1000) is None
            # A finished job's follow ends at once with its final state.
            assert (await job.wait(timeout_s=30)).status == "cancelled"
            with pytest.raises(InvalidRequest) as e:
                await job.resume()
            assert "checkpoint" in e.value.message
            fresh = await c.train(
                "new-one", GOOD, fresh=True, rank=8, target_modules=["q_proj"], max_steps=3
            )
            assert fresh.last is not None and fresh.last.from_version is None
            assert fresh.last.params["rank"] == 8 and fresh.last.total_steps == 3


def _lines(n: int) -> bytes:
    return "\n".join(json.dumps({"text": "x"}) for _ in range(n)).encode()


BAD_DATASETS = [
    (b"this is not json\n", InvalidRequest, "line 1"),
    (b'{"prompt": "only a prompt"}\n', InvalidRequest, "completion"),
    (b"\n\n  \n", InvalidRequest, "empty"),
    (b'{"text": "caf\xe9"}\n', InvalidRequest, "UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, InvalidRequest, "line 1"),
    (_lines(10_000), InvalidRequest, f"more than {MAX_EXAMPLES}"),
    (b'{"text": "' + b"x" * (MAX_BYTES + 10) + b'"}', PayloadTooLarge, "over the limit"),
    (json.dumps({"prompt": "word " * 200, "completion": "y"}).encode(), InvalidRequest, "tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(), InvalidRequest, ""),
]


async def test_bad_datasets_are_refused_naming_the_problem_and_nothing_is_queued(
    tmp_path: Path, valkey_url: str, raw: Any, tiny_model_dir: Path
) -> None:
    with trio.fail_after(240):
        async with (
            gateway(tmp_path, valkey_url, tiny_model_dir) as env,
            AsyncClient(env.address, env.key, timeout_s=60) as c,
        ):
            for data, error, needle in BAD_DATASETS:
                request = TrainSubmit("r-" + str(len(data)), env.key, "mine", params={})
                # Straight to the gateway: the SDK's own size check would stop the big one.
                with pytest.raises(error) as e:
                    await raw_call(c._session, request, 60, data)
                assert needle in e.value.message, (needle, e.value.message)
                assert e.value.field is not None and e.value.field.startswith("dataset")
                env.nothing_queued()
            with pytest.raises(PayloadTooLarge):  # the SDK refuses before sending
                await c.train("mine", b"x" * 100, max_dataset_bytes=10)
            path = tmp_path / "data.jsonl"
            path.write_bytes(b"")
            with pytest.raises(InvalidRequest, match="empty"):
                await c.train("mine", path)
            with pytest.raises(InvalidRequest, match="cannot read"):
                await c.train("mine", tmp_path / "missing.jsonl")
            env.nothing_queued()


BAD_SUBMISSIONS: list[tuple[dict[str, Any], type[VajraError], str]] = [
    ({"adapter": "nope"}, NotFoundError, "nope"),
    ({"adapter": "theirs"}, NotFoundError, "theirs"),
    ({"adapter": "mine", "from_version": 7}, NotFoundError, "mine@7"),
    ({"adapter": "../x"}, InvalidRequest, "adapter name"),
    ({"adapter": "mine", "params": {"learning_rate": 0.5}}, InvalidRequest, "learning_rate"),
    ({"adapter": "mine", "params": {"learning_rate": -1}}, InvalidRequest, "learning_rate"),
    ({"adapter": "mine", "params": {"epochs": 10_000}}, InvalidRequest, "epochs"),
    ({"adapter": "mine", "params": {"batch_size": "four"}}, InvalidRequest, "batch_size"),
    ({"adapter": "mine", "params": {"bogus": 1}}, InvalidRequest, "bogus"),
    ({"adapter": "mine", "params": {"rank": 8}}, InvalidRequest, "rank"),
    ({"adapter": "n", "fresh": True, "params": {"rank": 128}}, InvalidRequest, "rank"),
    ({"adapter": "n", "fresh": True, "params": {"target_modules": ["zz"]}}, InvalidRequest, "zz"),
    ({"adapter": "mine", "fresh": True, "from_version": 1}, InvalidRequest, "fresh"),
    ({"adapter": "mine", "dataset_uri": "s3://vajra/datasets/x.jsonl"}, InvalidRequest, "bucket"),
    ({"adapter": "mine", "dataset_uri": "http://example/x"}, InvalidRequest, "s3://"),
]


async def test_bad_submissions_are_refused_before_anything_is_queued(
    tmp_path: Path, valkey_url: str, raw: Any, tiny_model_dir: Path
) -> None:
    with trio.fail_after(240):
        async with (
            gateway(tmp_path, valkey_url, tiny_model_dir) as env,
            AsyncClient(env.address, env.key, timeout_s=60) as c,
        ):
            messages = {}
            for i, (fields, error, needle) in enumerate(BAD_SUBMISSIONS):
                request = TrainSubmit(f"b{i}", env.key, **fields)
                data = b"" if "dataset_uri" in fields else GOOD
                with pytest.raises(error) as e:
                    await raw_call(c._session, request, 60, data)
                assert needle in str(e.value), (needle, str(e.value))
                messages[fields["adapter"]] = e.value.message
                env.nothing_queued()
            # Another tenant's adapter reads exactly like one that does not exist.
            assert messages["theirs"].replace("theirs", "X") == messages["nope"].replace(
                "nope", "X"
            )
            with pytest.raises(InvalidRequest, match="learning_rate"):  # the SDK checks too
                await c.train("mine", GOOD, learning_rate=5.0)


async def test_per_tenant_job_limit(
    tmp_path: Path, valkey_url: str, raw: Any, tiny_model_dir: Path
) -> None:
    with trio.fail_after(120):
        async with (
            gateway(tmp_path, valkey_url, tiny_model_dir, max_jobs_per_tenant=2) as env,
            AsyncClient(env.address, env.key, timeout_s=60) as c,
            AsyncClient(env.address, env.other_key, timeout_s=60) as other,
        ):
            first = await c.train("mine", GOOD)
            await c.train("mine", GOOD)
            with pytest.raises(QuotaExceeded):
                await c.train("mine", GOOD)
            await other.train("theirs", GOOD)  # the other tenant has its own limit
            await first.cancel()
            await c.train("mine", GOOD)
            assert len(await c.jobs()) == 3
            # Content-addressed: stored once per tenant, each under its own prefix.
            assert [p.relative_to(env.objects).parts[1] for p in env.datasets()] == sorted(
                [env.tenant, env.other_tenant]
            )


async def test_follow_streams_progress_until_the_job_finishes(
    tmp_path: Path, valkey_url: str, raw: Any, tiny_model_dir: Path
) -> None:
    """The test plays the executor through the job store, as the executor does."""
    with trio.fail_after(120):
        async with (
            gateway(tmp_path, valkey_url, tiny_model_dir) as env,
            AsyncClient(env.address, env.key, timeout_s=60) as c,
        ):
            job = await c.train("mine", GOOD, epochs=1, batch_size=10)
            jobs = env.state.jobs
            seen = []
            async with job.follow(timeout_s=60) as progress:
                async for info in progress:
                    seen.append(info)
                    if info.status == "queued":
                        assert jobs.claim("ex-1", "tiny-llama", 60_000) is not None
                    elif info.status == "running" and info.step == 0:
                        jobs.progress(
                            job.job_id,
                            "ex-1",
                            step=1,
                            epoch=0,
                            loss=2.5,
                            tokens=100,
                            gradients=10,
                            cost_usd=0.01,
                        )
                    elif info.status == "running":
                        jobs.finish(job.job_id, "ex-1", "succeeded", result_version=2)
            assert [s.status for s in seen] == ["queued", "running", "running", "succeeded"]
            assert seen[2].loss == 2.5 and seen[2].step == 1
            assert seen[-1].result_version == 2 and seen[-1].terminal


async def test_a_job_seen_succeeding_drops_the_gateways_cached_resolution_of_its_adapter(
    tmp_path: Path, valkey_url: str, raw: Any, tiny_model_dir: Path
) -> None:
    """The executor flips the active pointer, not the gateway: without this the tenant that
    saw its job succeed would get the old version from this gateway's cache for up to
    ``adapters.resolve_cache_ttl_s``."""
    with trio.fail_after(120):
        async with (
            gateway(tmp_path, valkey_url, tiny_model_dir) as env,
            AsyncClient(env.address, env.key, timeout_s=60) as c,
        ):
            desk = env.gw.adapters
            jobs = env.state.jobs
            old = await c.train("mine", GOOD, epochs=1, batch_size=10)
            new = await c.train("mine", GOOD, epochs=1, batch_size=10)
            for job in (old, new):
                assert jobs.claim("ex-1", "tiny-llama", 60_000) is not None
                jobs.finish(job.job_id, "ex-1", "succeeded", result_version=1)
            # An old success (long before any cached resolution) leaves the cache alone.
            raw.hset(keys.job(old.job_id), "finished_ms", 1)
            resolved = await desk.resolve(env.tenant, "mine")
            assert resolved is not None and desk.cached(env.tenant, "mine") == (resolved,)
            assert (await old.status()).status == "succeeded"
            assert (await c.jobs(limit=5))[0].status == "succeeded"
            assert desk.cached(env.tenant, "mine") == (resolved,)
            # A fresh one, read by status or at the end of a follow, drops it.
            assert (await new.status()).status == "succeeded"
            assert desk.cached(env.tenant, "mine") is None
            await desk.resolve(env.tenant, "mine")
            assert desk.cached(env.tenant, "mine") is not None
            assert (await new.wait(timeout_s=30)).result_version == 1
            assert desk.cached(env.tenant, "mine") is None


async def test_a_lost_executor_fails_the_job_keeping_its_checkpoint_then_resume(
    tmp_path: Path, valkey_url: str, raw: Any, tiny_model_dir: Path
) -> None:
    with trio.fail_after(120):
        async with (
            gateway(tmp_path, valkey_url, tiny_model_dir) as env,
            AsyncClient(env.address, env.key, timeout_s=60) as c,
        ):
            job = await c.train("mine", GOOD)
            jobs = env.state.jobs
            assert jobs.claim("ex-1", "tiny-llama", 200) is not None
            jobs.checkpointed(job.job_id, "ex-1", key="checkpoints/x/3.safetensors", step=3)
            final = await job.wait(timeout_s=60)  # the gateway's expiry ends it
            assert final.status == "failed" and final.error == "executor lost"
            assert final.checkpoint_step == 3
            resumed = await job.resume()
            assert resumed.status == "queued" and resumed.attempt == 2
            again = jobs.claim("ex-2", "tiny-llama", 60_000)
            assert again is not None and again.checkpoint_key == "checkpoints/x/3.safetensors"


async def test_cancelling_a_follow_ends_the_stream_at_the_gateway(
    tmp_path: Path, valkey_url: str, raw: Any, tiny_model_dir: Path
) -> None:
    with trio.fail_after(120):
        async with (
            gateway(tmp_path, valkey_url, tiny_model_dir) as env,
            AsyncClient(env.address, env.key, timeout_s=60) as c,
        ):
            job = await c.train("mine", GOOD)
            async with job.follow() as progress:
                async for info in progress:
                    assert info.status == "queued"
                    assert len(env.gw.jobs._watches) == 1
                    break
            # Leaving the stream early tells the gateway, whose stream task ends.
            await wait_until(lambda: not env.gw.jobs._watches)
            assert (await job.status()).status == "queued"  # the job itself is untouched
            again = None
            with trio.move_on_after(10):  # a new follow works as before
                async with job.follow() as progress:
                    again = (await progress.__anext__()).status
            assert again == "queued"


def test_s3_datasets_must_be_in_the_clusters_bucket_under_the_tenants_prefix(
    tmp_path: Path, valkey_url: str
) -> None:
    """The gateway reads an s3:// dataset with the cluster's credentials, so it must never
    reach another bucket or another tenant's objects."""
    from vajra.actors.gateway_train import TrainChecks
    from vajra.state import OffLoop
    from vajra.storage import LocalObjectStore

    cfg = VajraConfig().replace("storage", kind="s3", s3_bucket="cluster-bucket")
    with ClusterState(valkey_url) as state:
        checks = TrainChecks(cfg, state, LocalObjectStore(tmp_path), OffLoop())
        key = checks._tenant_s3_key("t_1", "s3://cluster-bucket/datasets/t_1/a/b.jsonl")
        assert key == "datasets/t_1/a/b.jsonl"
        refused = [
            "s3://other-bucket/datasets/t_1/b.jsonl",  # another bucket
            "s3://cluster-bucket/datasets/t_2/b.jsonl",  # another tenant
            "s3://cluster-bucket/datasets/t_10/b.jsonl",  # a tenant whose id extends ours
            "s3://cluster-bucket/adapters/t_1/x",  # not a dataset
            "s3://cluster-bucket/datasets/t_1/../t_2/b.jsonl",  # climbing out
            "s3://cluster-bucket/datasets/t_1//b.jsonl",
            "s3://cluster-bucket",
            "S3://cluster-bucket/datasets/t_1/b.jsonl",
        ]
        for uri in refused:
            with pytest.raises(InvalidRequest) as e:
                checks._tenant_s3_key("t_1", uri)
            assert e.value.field == "dataset_uri", uri
        local = TrainChecks(VajraConfig(), state, LocalObjectStore(tmp_path), OffLoop())
        with pytest.raises(InvalidRequest, match="bucket"):
            local._tenant_s3_key("t_1", "s3://vajra/datasets/t_1/b.jsonl")
