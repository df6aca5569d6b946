"""Training jobs through every surface: the blocking SDK, the CLI and the HTTP bridge.

Test rules: ipc and loopback only, free ports; every test under ``trio.fail_after`` and every
HTTP call with a client timeout; a real gateway on the tiny model and a real bridge, no
executor (jobs stay queued unless the test plays the executor through the job store). The
blocking SDK, the CLI and httpx run in worker threads of the test's Trio run.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.actors.test_gateway_jobs import GOOD, Env, gateway
from vajra.cli import main as cli_main
from vajra.client import Client, InvalidRequest, NotFoundError, PayloadTooLarge
from vajra.http import HttpBridge

T = 30.0  # seconds, every blocking call


@asynccontextmanager
async def bridge(
    tmp_path: Path, valkey_url: str, model: Path, **training: Any
) -> AsyncIterator[tuple[Env, str]]:
    async with gateway(tmp_path, valkey_url, model, **training) as env:
        cfg = env.cfg.replace("cluster", gateway_address=env.address).replace(
            "http", port=0, base_model_name="tiny-llama", request_timeout_s=T
        )
        async with trio.open_nursery() as nursery:
            http = await nursery.start(HttpBridge(cfg).run)
            yield env, str(http)
            nursery.cancel_scope.cancel()


async def test_blocking_sdk_round_trip(
    tmp_path: Path, valkey_url: str, raw: Any, tiny_model_dir: Path
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(GOOD)

    def scenario(env: Env) -> None:
        with Client(env.address, env.key, timeout_s=T) as c:
            job = c.train("mine", data, epochs=1, batch_size=5, seed=3)
            assert job.last is not None and job.last.total_steps == 4
            assert job.last.params["seed"] == 3
            assert [j.job_id for j in c.jobs()] == [job.job_id]
            it = job.follow(timeout_s=T)
            assert next(it).status == "queued"
            it.close()  # ends the stream at the gateway
            jobs = env.state.jobs
            assert jobs.claim("ex-1", "tiny-llama", 60_000) is not None
            jobs.finish(job.job_id, "ex-1", "failed", error="boom")
            final = job.wait(timeout_s=T)
            assert final.status == "failed" and final.error == "boom"
            with pytest.raises(NotFoundError):
                c.job("j_" + "1" * 32).status()
            with pytest.raises(InvalidRequest):
                c.jobs(limit=0)
            with pytest.raises(PayloadTooLarge):
                c.train("mine", data, max_dataset_bytes=10)
            with pytest.raises(InvalidRequest, match="dataset"):
                c.train("mine", 12345)  # type: ignore[arg-type]

    with trio.fail_after(120):
        async with gateway(tmp_path, valkey_url, tiny_model_dir) as env:
            await trio.to_thread.run_sync(scenario, env)


async def test_cli_train_job_list_status_cancel(
    tmp_path: Path,
    valkey_url: str,
    raw: Any,
    tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "train.jsonl"
    data.write_bytes(GOOD)

    def run(env: Env, *argv: str) -> tuple[int, str, str]:
        code = cli_main([*argv, "--key", env.key, "--gateway", env.address, "--timeout", "30"])
        out, err = capsys.readouterr()
        return code, out, err

    def scenario(env: Env) -> None:
        code, out, _ = run(env, "train", "--adapter", "mine", "--data", str(data), "--json")
        assert code == 0, out
        job = json.loads(out)
        assert job["status"] == "queued" and job["adapter"] == "mine"
        code, out, _ = run(env, "job", "list")
        assert code == 0 and job["job_id"] in out and "queued" in out
        code, out, _ = run(env, "job", "status", job["job_id"])
        assert code == 0 and f"job {job['job_id']} (mine) queued" in out
        code, out, _ = run(env, "job", "cancel", job["job_id"])
        assert code == 0 and "cancelled" in out
        code, out, _ = run(env, "job", "status", job["job_id"], "--follow")
        assert code == 1 and "cancelled" in out  # followed to its end: not a success
        code, _, err = run(env, "job", "resume", job["job_id"])
        assert code == 1 and "checkpoint" in err
        # Bad input exits 1 naming the problem; nothing is queued.
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "no completion"}\n')
        code, _, err = run(env, "train", "--adapter", "mine", "--data", str(bad))
        assert code == 1 and "completion" in err
        code, _, err = run(env, "train", "--adapter", "ghost", "--data", str(data))
        assert code == 1 and "not_found" in err
        code, _, err = run(
            env, "train", "--adapter", "x", "--fresh", "--rank", "999", "--data", str(data)
        )
        assert code == 1 and "rank" in err
        code, _, err = run(
            env, "train", "--adapter", "mine", "--data", str(data), "--param", "nope=1"
        )
        assert code == 1 and "nope" in err
        assert len(env.state.jobs.list(env.tenant)) == 1
        # Followed from the start to success, the executor played through the job store.
        code, out, _ = run(env, "train", "--adapter", "mine", "--data", str(data), "--json")
        second = json.loads(out)["job_id"]
        jobs = env.state.jobs
        assert jobs.claim("ex-1", "tiny-llama", 60_000) is not None
        jobs.progress(
            second, "ex-1", step=5, epoch=1, loss=0.5, tokens=10, gradients=5, cost_usd=0.1
        )
        jobs.finish(second, "ex-1", "succeeded", result_version=2)
        code, out, _ = run(env, "job", "status", second, "--follow")
        assert code == 0 and "succeeded" in out and "trained version mine@2" in out

    with trio.fail_after(180):
        async with gateway(tmp_path, valkey_url, tiny_model_dir) as env:
            await trio.to_thread.run_sync(scenario, env)


async def test_http_bridge_round_trip_and_errors(
    tmp_path: Path, valkey_url: str, raw: Any, tiny_model_dir: Path
) -> None:
    def scenario(env: Env, base: str) -> None:
        auth = {"Authorization": f"Bearer {env.key}"}
        other = {"Authorization": f"Bearer {env.other_key}"}
        with httpx.Client(base_url=base, timeout=T) as h:
            r = h.post(
                "/v1/models/mine/train", json={"dataset": GOOD.decode(), "epochs": 2}, headers=auth
            )
            assert r.status_code == 201, r.text
            job = r.json()
            assert job["status"] == "queued" and job["params"]["epochs"] == 2
            r = h.post(
                "/v1/models/mine/train",
                json={"dataset_base64": base64.b64encode(GOOD).decode(), "params": {"seed": 4}},
                headers=auth,
            )
            assert r.status_code == 201 and r.json()["params"]["seed"] == 4
            listed = h.get("/v1/jobs", headers=auth).json()["data"]
            assert len(listed) == 2 and listed[1]["id"] == job["id"]
            assert h.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "queued"
            assert h.get(f"/v1/jobs/{job['id']}", headers=other).status_code == 404
            assert h.get("/v1/jobs", headers=other).json()["data"] == []
            assert h.delete(f"/v1/jobs/{job['id']}", headers=other).status_code == 404
            r = h.delete(f"/v1/jobs/{job['id']}", headers=auth)
            assert r.status_code == 200 and r.json()["status"] == "cancelled"
            with h.stream("GET", f"/v1/jobs/{job['id']}/events", headers=auth) as s:
                events = [line for line in s.iter_lines() if line.startswith("data: ")]
            assert json.loads(events[0][6:])["status"] == "cancelled"
            assert events[-1] == "data: [DONE]"
            # Refusals keep their status and name the problem; nothing is queued.
            cases = [
                ({"dataset": "not json"}, 400, "dataset"),
                ({"dataset": ""}, 400, "dataset"),
                ({"dataset": '{"text": "a"}', "dataset_uri": "s3://x/y"}, 400, "dataset"),
                ({"dataset_base64": "%%%"}, 400, "dataset_base64"),
                ({"dataset": '{"text": "a"}', "learning_rate": 0.5}, 400, "learning_rate"),
                ({"dataset": '{"text": "a"}', "surprise": 1}, 400, "surprise"),
                ({"dataset": '{"text": "a"}', "fresh": True, "rank": 4096}, 400, "rank"),
                ({"dataset": "x" * 300_000}, 413, ""),
            ]
            for body, status, needle in cases:
                r = h.post("/v1/models/mine/train", json=body, headers=auth)
                assert r.status_code == status, (body, r.text)
                assert needle in r.text
            r = h.post("/v1/models/theirs/train", json={"dataset": GOOD.decode()}, headers=auth)
            assert r.status_code == 404
            r = h.post("/v1/models/mine/train", json={"dataset": GOOD.decode()})
            assert r.status_code == 401
            assert len(env.state.jobs.list(env.tenant)) == 2
            assert "/v1/models/{model_id}/train" in h.get("/openapi.json").json()["paths"]

    with trio.fail_after(180):
        async with bridge(tmp_path, valkey_url, tiny_model_dir) as (env, base):
            await trio.to_thread.run_sync(scenario, env, base)
