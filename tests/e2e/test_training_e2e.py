"""Fine-tuning end to end on a real cluster (`vajra up`, the tiny model on the CPU, the HTTP
bridge on): the SDK, a kill -9 of the executor mid-job, the CLI and the bridge.

- SDK: a fresh adapter, then a job that memorises 20 prompt/completion pairs (rank 16 on
  every projection, lr 5e-3, batch 4, 40 epochs: 200 optimizer steps; the thresholds of
  tests/actors/test_executor_jobs.py), followed until it succeeds while clients stream
  requests without pause (none may fail, some must finish while it trains); then ``NAME``
  reproduces every completion greedily, ``NAME@1`` answers exactly as before and a rollback
  to version 1 makes ``NAME`` answer as before again.
- kill -9 of the executor process mid-job: the gateway's lease expiry marks the job failed
  ("executor lost") with its last checkpoint, the supervisor restarts the executor, and
  ``job.resume()`` continues from the checkpoint (progress never goes below it) to success,
  with the progress counters counting every optimizer step once.
- CLI: ``vajra train --follow`` and ``vajra job status/list/cancel`` with their exit codes;
  HTTP: ``POST /v1/models/{id}/train`` then ``GET /v1/jobs/{id}/events`` (server-sent events).

Test rules: loopback only; every wait bounded (``fail_after``, subprocess timeouts); the
cluster is stopped with SIGTERM at the end and must exit 0; no timing assertions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio

from tests.e2e.harness import RunningCluster, actor_pids, alive, running_cluster
from tests.gpu.training_kit import jsonl, pairs
from vajra.client import AsyncClient, JobInfo, NotFoundError, VajraError

pytestmark = pytest.mark.e2e
T = TypeVar("T")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: The memorisation job (200 optimizer steps): its final loss ends near 0.2 on the tiny model.
MEMORISE: dict[str, Any] = {"epochs": 40, "learning_rate": 5e-3, "batch_size": 4}
LOSS_THRESHOLD = 0.5
LIMIT_S = 240
CONFIG = """
[gateway]
max_prompt_chars = 2000
[executor]
max_model_len = 256
heartbeat_interval_s = 0.2
[training]
lease_ms = 1500
expire_interval_s = 0.3
progress_poll_s = 0.1
[http]
enabled = true
port = 0
"""


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningCluster]:
    with running_cluster(
        tmp_path_factory.mktemp("training"), tiny_model_dir, config_text=CONFIG
    ) as c:
        yield c


def _tenant(cluster: RunningCluster, name: str) -> str:
    return cluster.create_tenant(f"{name}-{uuid.uuid4().hex[:6]}")[1]


async def _ready(c: AsyncClient) -> None:
    """Until the executor answers (after a start or a restart)."""
    while True:
        try:
            await c.infer("hello", max_tokens=1)
            return
        except VajraError:
            await trio.sleep(0.2)


async def _answers(c: AsyncClient, prompts: list[str], adapter: str) -> list[str]:
    out = []
    for p in prompts:
        r = await c.infer(p, adapter=adapter, max_tokens=16, temperature=0.0)
        out.append(r.text)
    return out


async def _poll(get: Callable[[], Awaitable[T]], done: Callable[[T], bool]) -> T:
    """``await get()`` every 0.1 s until ``done`` holds for its value; that value."""
    while True:
        value = await get()
        if done(value):
            return value
        await trio.sleep(0.1)


def _actors(cluster: RunningCluster) -> dict[int, str]:
    """The cluster's live actor processes: pid -> actor name (from their command lines)."""
    out = {}
    for pid in actor_pids(cluster.home):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "actor" in argv[:-1] and alive(pid):
            out[pid] = argv[argv.index("actor") + 1]
    return out


def _executor_pid(cluster: RunningCluster) -> int | None:
    """The pid of the cluster's (one) executor process."""
    return next((p for p, name in _actors(cluster).items() if name == "executor"), None)


async def test_sdk_memorises_swaps_in_keeps_v1_and_rolls_back_while_inference_streams(
    cluster: RunningCluster,
) -> None:
    key = _tenant(cluster, "sdk")
    rows = pairs(20)
    prompts = [r["prompt"] for r in rows]
    completions = [r["completion"] for r in rows]
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(cluster.gateway, key, timeout_s=60) as c:
            await _ready(c)
            # Version 1: a fresh adapter, briefly trained on other pairs.
            first = await c.train(
                "mem",
                jsonl(pairs(20, seed=7)),
                fresh=True,
                rank=16,
                alpha=32.0,
                target_modules=ALL,
                epochs=2,
                learning_rate=5e-3,
                batch_size=4,
                checkpoint_every=0,
            )
            v1 = await first.wait(timeout_s=120)
            assert v1.status == "succeeded" and v1.result_version == 1, v1.error
            before = await _answers(c, prompts, "mem")
            assert before != completions

            failures: list[BaseException] = []
            finished_at: list[float] = []  # when each streamed request ended
            stop = trio.Event()

            # The base model and version 1 answer as before while the job trains; NAME
            # answers with version 1 or 2 (the flip comes during the run).
            streamed = [None, "mem@1", "mem"]
            greedy: dict[str, Any] = {"max_tokens": 8, "temperature": 0.0}
            expected = [
                list((await c.infer(prompts[n], adapter=a, **greedy)).tokens)
                for n, a in enumerate(streamed)
            ]

            async def streamer(n: int) -> None:
                while not stop.is_set():
                    try:
                        tokens: list[int] = []
                        async with c.stream(prompts[n], adapter=streamed[n], **greedy) as s:
                            async for chunk in s:
                                tokens += chunk.token_ids
                        assert tokens, "a stream ended without a token"
                        if n < 2:
                            assert tokens == expected[n], (streamed[n], tokens, expected[n])
                    except (VajraError, AssertionError) as exc:
                        failures.append(exc)
                        return
                    finished_at.append(trio.current_time())

            progress: list[JobInfo] = []
            running_from = running_until = 0.0
            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(streamer, n)
                job = await c.train("mem", jsonl(rows), **MEMORISE, checkpoint_every=50)
                assert job.last is not None and job.last.from_version == 1
                async with job.follow(timeout_s=180) as follow:
                    async for info in follow:
                        if info.status == "running" and not running_from:
                            running_from = trio.current_time()
                        progress.append(info)
                running_until = trio.current_time()
                stop.set()
            done = progress[-1]
            assert done.status == "succeeded", done.error
            assert done.result_version == 2 and done.step == done.total_steps == 200
            # Checkpoints every 50 steps; the model thread may be a step ahead of the loop when
            # one is taken, and it is filed under the step it holds.
            assert done.loss < LOSS_THRESHOLD and 150 <= done.checkpoint_step < 200
            steps = [i.step for i in progress]
            assert steps == sorted(steps) and len(set(steps)) > 2, steps
            assert all(i.gradients == done.gradients // 200 * i.step for i in progress)
            # Inference kept flowing while the job trained, and nothing failed.
            assert failures == []
            assert running_from, "the follow never saw the job running"
            during = [t for t in finished_at if running_from <= t <= running_until]
            assert len(during) >= 3, (len(during), len(finished_at))

            # The trained version reproduces the completions; version 1 answers as before.
            assert await _answers(c, prompts, "mem") == completions
            assert await _answers(c, prompts, "mem@1") == before
            versions = {v.version: v for v in await c.versions("mem")}
            assert versions[2].active and versions[2].parent_version == 1
            assert versions[2].metrics["final_loss"] < LOSS_THRESHOLD
            back = await c.rollback("mem", 1)
            assert back.version == 1 and back.active
            assert await _answers(c, prompts, "mem") == before
            assert [j.job_id for j in await c.jobs(limit=2)] == [job.job_id, first.job_id]


async def test_kill_9_of_the_executor_fails_the_job_and_resume_continues_from_its_checkpoint(
    cluster: RunningCluster,
) -> None:
    key = _tenant(cluster, "kill")
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(cluster.gateway, key, timeout_s=60) as c:
            await _ready(c)
            job = await c.train(
                "resumable",
                jsonl(pairs(8)),
                fresh=True,
                rank=4,
                target_modules=["q_proj", "v_proj"],
                epochs=100,
                batch_size=2,
                learning_rate=1e-3,
                max_steps=400,
                checkpoint_every=10,
            )
            while True:
                now = await job.status()
                assert now.status in ("queued", "running"), now
                if now.checkpoint_step >= 20:
                    break
                await trio.sleep(0.05)
            per_step = now.gradients // now.step
            victim = _executor_pid(cluster)
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            # The lease passes; the gateway marks the job failed, keeping its checkpoint.
            failed = await _poll(job.status, lambda j: j.status != "running")
            assert failed.status == "failed" and failed.error == "executor lost", failed
            assert failed.checkpoint_step >= 20 and failed.step >= failed.checkpoint_step
            assert failed.step < 400, "the kill came too late to be mid-training"
            # The supervisor starts a new executor process.
            restarted = await _poll(
                lambda: trio.to_thread.run_sync(_executor_pid, cluster),
                lambda pid: pid not in (None, victim),
            )
            assert not alive(victim)
            resumed = await job.resume()
            assert resumed.status == "queued" and resumed.attempt == 2
            seen: list[JobInfo] = []
            async with job.follow(timeout_s=180) as follow:
                async for info in follow:
                    seen.append(info)
            done = seen[-1]
            assert done.status == "succeeded", done.error
            assert done.step == 400 and done.result_version == 1 and done.attempt == 2
            # Training went on from the checkpoint: progress never went back below it.
            assert min(i.step for i in seen) >= failed.checkpoint_step, [i.step for i in seen]
            # Each optimizer step counted once, steps redone after the resume included.
            assert done.gradients == per_step * 400, (done.gradients, per_step)
            assert restarted is not None and alive(restarted)
            assert (await c.infer("hello", adapter="resumable", max_tokens=2)).tokens
    assert "restarting" in cluster.full_log()


def _cli(cluster: RunningCluster, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    out = cluster.cli(*args, timeout=timeout)
    return out.returncode, out.stdout, out.stderr


async def test_cli_train_follow_job_status_list_and_cancel(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    key = _tenant(cluster, "cli")
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(pairs(8)))
    small = ["--fresh", "--rank", "4", "--target-modules", "q_proj,v_proj", "--batch-size", "4"]
    with trio.fail_after(LIMIT_S):
        train = ["train", "--key", key, "--adapter", "cli-bot", "--data", str(data), *small]
        train += ["--epochs", "3", "--batch-size", "1", "--param", "checkpoint_every=4", "--follow"]
        code, out, err = await trio.to_thread.run_sync(lambda: _cli(cluster, *train))
        assert code == 0, (out, err)
        job_id = out.split()[1]
        assert out.startswith(f"job {job_id} queued: cli-bot, 24 steps"), out
        assert f"job {job_id} (cli-bot) succeeded: step 24/24" in out, out
        assert "trained version cli-bot@1" in out

        code, out, err = await trio.to_thread.run_sync(
            lambda: _cli(cluster, "job", "status", job_id, "--key", key, "--json")
        )
        assert code == 0, err
        status = json.loads(out)
        assert status["status"] == "succeeded" and status["result_version"] == 1
        assert 4 <= status["checkpoint_step"] < 24 and status["step"] == 24
        code, out, _ = await trio.to_thread.run_sync(
            lambda: _cli(cluster, "job", "list", "--key", key)
        )
        assert code == 0 and job_id in out and "cli-bot@1" in out

        # Someone else's job, a job that does not exist, a bad dataset: exit 1, one line.
        other = _tenant(cluster, "cli-other")
        for args in (
            ("job", "status", job_id, "--key", other),
            ("job", "status", "j_" + "0" * 24, "--key", key),
        ):
            code, out, err = await trio.to_thread.run_sync(_cli, cluster, *args)
            assert code == 1 and "not_found" in err and out == "", (code, out, err)
        csv = tmp_path / "bad.csv"
        csv.write_text("prompt,completion\nhi,there\n")
        code, out, err = await trio.to_thread.run_sync(
            lambda: _cli(
                cluster, "train", "--key", key, "--adapter", "x", "--data", str(csv), *small
            )
        )
        assert code == 1 and "line 1" in err, err
        code, out, err = await trio.to_thread.run_sync(
            lambda: _cli(cluster, "job", "status", job_id, "--key", "not-a-key")
        )
        assert code == 1 and err, err

        # A followed job that is cancelled meanwhile: the follow ends with exit code 1.
        many = tmp_path / "many.jsonl"
        many.write_bytes(jsonl(pairs(100)))  # 10,000 steps of one example: it will not end
        argv = [sys.executable, "-m", "vajra", "train", "--key", key, "--adapter", "long"]
        argv += ["--data", str(many), *small, "--batch-size", "1", "--epochs", "100"]
        argv += ["--json", "--follow"]
        proc = await trio.to_thread.run_sync(
            lambda: subprocess.Popen(
                argv, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
        try:
            assert proc.stdout is not None
            first = await trio.to_thread.run_sync(proc.stdout.readline)
            long_id = json.loads(first)["job_id"]
            async with AsyncClient(cluster.gateway, key, timeout_s=60) as c:
                await _poll(c.job(long_id).status, lambda j: j.step >= 2)
            code, out, err = await trio.to_thread.run_sync(
                lambda: _cli(cluster, "job", "cancel", long_id, "--key", key)
            )
            assert code == 0 and long_id in out, err
            rest, _ = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=120))
            assert proc.returncode == 1, rest
            final = json.loads(rest.strip().splitlines()[-1])
            assert final["status"] == "cancelled" and final["job_id"] == long_id
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _sse_jobs(http: httpx.Client, job_id: str, key: str) -> tuple[list[dict[str, Any]], bool]:
    """The job events of ``GET /v1/jobs/{id}/events`` until it closes; (events, saw [DONE])."""
    events: list[dict[str, Any]] = []
    done = False
    headers = {"Authorization": f"Bearer {key}"}
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            events.append(json.loads(line[len("data: ") :]))
    return events, done


async def test_http_bridge_trains_and_streams_job_events(cluster: RunningCluster) -> None:
    key = _tenant(cluster, "http")
    other = _tenant(cluster, "http-other")
    address = str(cluster.info["http_address"])
    body = {
        "dataset": jsonl(pairs(8)).decode(),
        "fresh": True,
        "rank": 4,
        "target_modules": ["q_proj", "v_proj"],
        "epochs": 2,
        "batch_size": 4,
        "params": {"checkpoint_every": 0},
    }

    def drive() -> None:
        with httpx.Client(base_url=address, timeout=60) as http:
            auth = {"Authorization": f"Bearer {key}"}
            r = http.post("/v1/models/http-bot/train", json=body)
            assert r.status_code == 401, r.text
            r = http.post("/v1/models/http-bot/train", json={**body, "epochs": 0}, headers=auth)
            assert r.status_code == 400 and "epochs" in r.text, r.text
            r = http.post("/v1/models/http-bot/train", json=body, headers=auth)
            assert r.status_code == 201, r.text
            job = r.json()
            assert job["object"] == "training.job" and job["status"] in ("queued", "running")
            events, done = _sse_jobs(http, job["id"], key)
            assert done and events, events
            assert events[-1]["status"] == "succeeded" and events[-1]["result_version"] == 1
            steps = [e["step"] for e in events]
            assert steps == sorted(steps) and steps[-1] == 4
            r = http.get(f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {other}"})
            assert r.status_code == 404, r.text
            r = http.get(f"/v1/jobs/{job['id']}/events", headers=auth)
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text

    with trio.fail_after(LIMIT_S):
        async with AsyncClient(cluster.gateway, key, timeout_s=60) as c:
            await _ready(c)
            await trio.to_thread.run_sync(drive)
            assert (await c.infer("hello", adapter="http-bot", max_tokens=2)).tokens
            with pytest.raises(NotFoundError):
                await c.infer("hello", adapter="http-bot@2", max_tokens=2)


def test_one_executor_runs_after_the_restart(cluster: RunningCluster) -> None:
    """The supervisor replaced the killed executor with exactly one process: the cluster runs
    its five actors and the bridge."""
    deadline = time.monotonic() + 30
    while True:
        names = sorted(_actors(cluster).values())
        if len(names) == 6 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert names == ["executor", "gateway", "http", "ledger", "predictor", "scheduler"], names
