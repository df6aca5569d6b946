"""End to end: billing is exact across crashes — nothing lost, nothing counted twice.

A real cluster (`vajra up`, two executors on the tiny model) serves 2,000 requests of two
tenants: plain ones, streams read to the end, streams abandoned after their first chunk, and
requests whose deadline passes mid-generation. Midway the ledger is killed with SIGKILL, later
one executor; the supervisor restarts both. Then:

* what the executors computed is read back independently of the ledger, from their usage
  journals (``executor.keep_usage_journals`` keeps every segment): one event per id;
* every result a client received appears among those events (same tokens, same GPU time);
* the ledger's buckets equal the sums over those events exactly: events, billed GPU ms
  (each request rounded up to the granularity, computed here), GPU µs, tokens, gradients;
* the invoice's costs equal the paper's formulas computed here.

A training job (a fresh rank-4 adapter on q_proj and v_proj, :data:`TRAIN_STEPS` optimizer
steps, a checkpoint every :data:`CHECKPOINT_EVERY`) is submitted as the requests start and
trains while they flow. The executor killed is *the one running the job*, once the job has
passed a checkpoint and computed steps beyond it: the job fails ("executor lost") with its
checkpoint, is resumed, and redoes those steps on an executor (the other one, or the restarted
one). So the run shows both halves of the rule: inference on the killed executor billed as
computed, and a training step computed twice billed once. Checked independently of the ledger:

* the executors' journals hold exactly one event id per optimizer step, every copy with
  gradients = the trainable parameters (computed here from the rank and the tiny model's
  module shapes), and the steps past the checkpoint really were computed twice;
* the ledger's gradients are trainable parameters x distinct steps, its GPU time is the
  inference events' plus one copy of each training step's;
* the job reports the same gradients, tokens and (the formula's) cost; the invoice's training
  line costs gradients x price per million / 1e6 x price per hour.

Test rules: loopback only; every wait bounded (``trio.fail_after``, subprocess timeouts).
"""

# Over 400 lines: one end-to-end scenario (a cluster, 2,000 requests, a job, two kills) and its
# independent accounting; split up, its pieces would only be read together.

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import signal
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import redis
import trio

from tests.e2e.harness import RunningCluster, pgrep, start_cluster, stop_cluster
from vajra.actors.usage_journal import read_segments, segments
from vajra.bus.messages import UsageEvent
from vajra.client import AsyncClient, JobInfo, VajraError
from vajra.policies.billing import Prices
from vajra.state import ClusterState, keys

pytestmark = pytest.mark.e2e

N_REQUESTS = 2_000
CONCURRENCY = 24
GRANULARITY_MS = 10
#: The training job: a fresh adapter, ``TRAIN_STEPS`` optimizer steps of 2 examples.
TRAIN_ADAPTER = "ledger-bot"
TRAIN_RANK = 4
TRAIN_MODULES = ("q_proj", "v_proj")
TRAIN_STEPS = 36
CHECKPOINT_EVERY = 10  # a wide window to catch the job in: 2..8 steps past a checkpoint
GRAD_ACCUM = 8
#: Steps computed past the checkpoint before the kill: they are computed again after it.
REDONE_AT_LEAST = 2
CONFIG = f"""
[gateway]
max_tokens_limit = 512
[http]
enabled = false
[executor]
usage_resend_s = 0.3
keep_usage_journals = true
[ledger]
usage_stream_maxlen = 500
[policies]
billing_granularity_ms = {GRANULARITY_MS}
[training]
lease_ms = 3000
expire_interval_s = 0.3
progress_poll_s = 0.2
"""
PROMPTS = ["The river", "Once upon a time", "numbers: 1 2 3", "hello", "Why is the sky"]
TRAIN_ROWS = [
    {"prompt": f"{PROMPTS[i % len(PROMPTS)]} {i} ->", "completion": f" the answer is {i}."}
    for i in range(8)
]


def training_events_expected() -> int:
    """Training steps this run adds: one usage event per optimizer step of the job, a step
    computed again after the resume counted once."""
    return TRAIN_STEPS


def trainable_params(model_dir: Path, rank: int, modules: tuple[str, ...]) -> int:
    """LoRA parameters of ``modules`` at ``rank`` on the model in ``model_dir``, from its
    ``config.json``: per layer and module, A is rank x in and B is out x rank."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q_out = cfg["num_attention_heads"] * head_dim
    kv_out = cfg["num_key_value_heads"] * head_dim
    shapes = {  # module: (in features, out features)
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    per_layer = sum(rank * (int(shapes[m][0]) + int(shapes[m][1])) for m in modules)
    return int(cfg["num_hidden_layers"]) * per_layer


def _actor_pid(cluster: RunningCluster, name: str, executor_id: str | None = None) -> int:
    for pid in pgrep(f"actor {name} --config {cluster.home}/run/cluster.toml"):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if executor_id is None or executor_id.encode() in cmdline:
            return pid
    raise AssertionError(f"no {name} {executor_id or ''} process")


def _journal_events(home: Path) -> tuple[dict[str, UsageEvent], int]:
    """Every event any executor journaled (one per id), and how many are unacknowledged."""
    events: dict[str, UsageEvent] = {}
    unacked = 0
    for directory in sorted((home / "usage").glob("exec-*")):
        every = read_segments(segments(directory, include_done=True))
        events.update(every.events)
        unacked += len(read_segments(segments(directory)).unacked())
    return events, unacked


def _training_copies(home: Path) -> dict[str, set[UsageEvent]]:
    """Every distinct computation of each training step in the executors' journals: event id
    -> its copies. A copy carried over by a journal's recovery is the same event (same
    executor, time and GPU ms); a step computed again is another one."""
    copies: dict[str, set[UsageEvent]] = {}
    for directory in sorted((home / "usage").glob("exec-*")):
        for path in segments(directory, include_done=True):
            for raw in path.read_bytes().split(b"\n"):
                try:
                    line = msgspec.json.decode(raw)
                except msgspec.DecodeError:
                    continue  # a torn last line: never sent
                if isinstance(line, dict) and isinstance(line.get("e"), dict):
                    event = msgspec.convert(line["e"], UsageEvent)
                    if event.kind == "training":
                        copies.setdefault(event.event_id, set()).add(event)
    return copies


def _sums_of_one_copy_each(values: list[set[int]]) -> set[int]:
    """Every total of choosing one value from each set (which copy of a step the ledger kept
    depends on which arrived first)."""
    totals = {0}
    for options in values:
        totals = {t + v for t in totals for v in options}
    return totals


class Outcomes:
    def __init__(self) -> None:
        self.completed: Counter[tuple[int, int, float]] = Counter()  # (prompt, completion, ms)
        self.kinds: Counter[str] = Counter()


@dataclass
class Run:
    """What the drivers share: requests done, actors killed, the job's story."""

    done: int = 0
    killed: list[str] = field(default_factory=list)
    victim: str = ""  # the executor id killed (the one running the job)
    killed_ms: int = 0  # when (Unix ms)
    executor_killed: trio.Event = field(default_factory=trio.Event)
    at_kill: JobInfo | None = None  # the job as last seen before the kill
    failed: JobInfo | None = None  # the job as the lease expiry left it
    final: JobInfo | None = None
    job_id: str = ""


async def _one(c: AsyncClient, i: int, rng: random.Random, out: Outcomes) -> None:
    prompt = PROMPTS[i % len(PROMPTS)]
    kind = rng.choices(["plain", "stream", "abandon", "deadline"], [5, 2, 2, 1])[0]
    try:
        if kind == "plain":
            r = await c.infer(prompt, max_tokens=rng.randint(1, 6), timeout_s=20)
            out.completed[(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.gpu_ms)] += 1
        elif kind == "stream":
            async with c.stream(prompt, max_tokens=rng.randint(1, 6), timeout_s=20) as chunks:
                async for chunk in chunks:
                    if chunk.usage is not None and chunk.finish_reason is not None:
                        u = chunk.usage
                        out.completed[(u.prompt_tokens, u.completion_tokens, u.gpu_ms)] += 1
        elif kind == "abandon":
            async with c.stream(prompt, max_tokens=200, ignore_eos=True, timeout_s=20) as chunks:
                async for _ in chunks:
                    break  # walk away mid-stream: the executor bills what it computed
        else:
            await c.infer(prompt, max_tokens=400, ignore_eos=True, timeout_s=0.05)
        out.kinds[f"{kind}_ok"] += 1
    except VajraError as exc:  # deadlines, and requests on the killed executor
        out.kinds[f"{kind}_{type(exc).__name__}"] += 1


async def _drive(cluster: RunningCluster, keys: list[str], out: Outcomes, run: Run) -> None:
    """Send the requests; kill the ledger a quarter of the way through. The last quarter
    waits for the executor's kill (the job's progress decides when it comes), so requests
    flow before and after it."""
    rng = random.Random(12)
    todo = iter(range(N_REQUESTS))

    async def worker(c: AsyncClient, w: int) -> None:
        wrng = random.Random(w)
        for i in todo:
            if i >= N_REQUESTS * 3 // 4:  # the last quarter flows after the executor's kill
                await run.executor_killed.wait()
            await _one(c, i, wrng, out)
            run.done += 1
            if run.done == N_REQUESTS // 4 and "ledger" not in run.killed:
                run.killed.append("ledger")
                os.kill(_actor_pid(cluster, "ledger"), signal.SIGKILL)

    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(AsyncClient(cluster.gateway, key)) for key in keys
        ]
        async with trio.open_nursery() as nursery:
            for w in range(CONCURRENCY):
                nursery.start_soon(worker, clients[w % len(clients)], w + rng.randint(0, 1000))


def _job_executor(cluster: RunningCluster, tenant_id: str, job_id: str) -> str:
    with ClusterState(cluster.redis_url) as state:
        return state.jobs.get(tenant_id, job_id).executor_id


async def _train_through_the_crash(
    cluster: RunningCluster, tenant_id: str, key: str, run: Run
) -> None:
    """Submit the job; once the ledger was killed and the job computed steps past a
    checkpoint, kill -9 the executor running it; resume it after the lease expiry marked it
    failed; wait for it to succeed."""
    async with AsyncClient(cluster.gateway, key, timeout_s=30) as c:
        lines = "".join(json.dumps(r) + "\n" for r in TRAIN_ROWS).encode()
        job = await c.train(
            TRAIN_ADAPTER,
            lines,
            fresh=True,
            rank=TRAIN_RANK,
            target_modules=list(TRAIN_MODULES),
            epochs=100,
            batch_size=2,
            learning_rate=1e-3,
            max_steps=TRAIN_STEPS,
            checkpoint_every=CHECKPOINT_EVERY,
            grad_accum_steps=GRAD_ACCUM,
        )
        run.job_id = job.job_id
        while True:
            now = await job.status()
            assert now.status in ("queued", "running"), f"the job ended before the kill: {now}"
            # Past a checkpoint by a few steps, the next one still two steps away.
            past = now.step - now.checkpoint_step
            ready = now.checkpoint_step >= CHECKPOINT_EVERY and run.killed
            if ready and REDONE_AT_LEAST <= past <= CHECKPOINT_EVERY - 2:
                break
            await trio.sleep(0.05)
        run.victim = await trio.to_thread.run_sync(_job_executor, cluster, tenant_id, job.job_id)
        assert run.done < N_REQUESTS, "the requests were over before the executor was killed"
        run.at_kill = now
        run.killed.append("executor")
        pid = _actor_pid(cluster, "executor", run.victim)
        os.kill(pid, signal.SIGKILL)
        run.killed_ms = int(time.time() * 1000)  # as executors stamp events: all older
        run.executor_killed.set()
        while True:  # the lease passes; the gateway marks the job failed
            now = await job.status()
            if now.status != "running":
                break
            await trio.sleep(0.1)
        run.failed = now
        assert now.status == "failed" and now.error == "executor lost", now
        resumed = await job.resume()
        assert resumed.status == "queued" and resumed.attempt == 2, resumed
        run.final = await job.wait(timeout_s=180)


@pytest.fixture(scope="module")
def billing_cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("billing")
    c = start_cluster(
        tmp, tiny_model_dir, config_text=CONFIG, args=("--gateway-port", "0", "--executors", "2")
    )
    try:
        yield c
    finally:
        if c.process.poll() is None:
            stop_cluster(c)


def _check_training(cluster: RunningCluster, run: Run, tenant_id: str) -> dict[str, set[int]]:
    """The journals' training events against the job's story, independently of the ledger;
    returns each step's possible GPU µs (one value per computation of it)."""
    per_step = trainable_params(cluster.model_dir, TRAIN_RANK, TRAIN_MODULES)
    assert per_step == 2 * 4 * (64 + 64) + 2 * 4 * (64 + 32)  # the tiny model: 2 layers
    copies = _training_copies(cluster.home)
    ids = {f"train.{run.job_id}.{s}": s for s in range(1, TRAIN_STEPS + 1)}
    assert set(copies) == set(ids), sorted(set(copies) ^ set(ids))[:5]
    assert run.failed is not None and run.at_kill is not None
    checkpoint = run.failed.checkpoint_step
    assert checkpoint == run.at_kill.checkpoint_step >= CHECKPOINT_EVERY, run.failed
    before = {i: [e for e in same if e.ts_unix_ms <= run.killed_ms] for i, same in copies.items()}
    last_before = max(ids[i] for i, found in before.items() if found)
    for event_id, same in copies.items():
        assert {(e.gradients, e.tenant_id, e.adapter, e.adapter_version) for e in same} == {
            (per_step, tenant_id, TRAIN_ADAPTER, 0)
        }, (event_id, same)
        assert len({e.prompt_tokens for e in same}) == 1, same  # the same step, the same data
        step, ahead = ids[event_id], before[event_id]
        after = [e for e in same if e.ts_unix_ms > run.killed_ms]
        assert len(ahead) + len(after) == len(same), same
        assert all(e.executor_id == run.victim for e in ahead), same
        # Before the kill the victim computed steps 1..last_before, each once; the resumed
        # job computed each step past the checkpoint once more.
        assert len(ahead) == (step <= last_before), (step, last_before, same)
        assert len(after) == (step > checkpoint), (step, checkpoint, same)
    assert last_before >= run.at_kill.step >= checkpoint + REDONE_AT_LEAST, (last_before, run)
    redone = [i for i, same in copies.items() if len(same) > 1]
    assert len(redone) == last_before - checkpoint, redone
    return {i: {round(e.gpu_ms * 1000) for e in same} for i, same in copies.items()}


async def test_billing_is_exact_across_ledger_and_executor_crashes(
    billing_cluster: RunningCluster,
) -> None:
    cluster = billing_cluster
    tenants = [cluster.create_tenant(name) for name in ("acme", "globex")]
    trainer_id, trainer_key = tenants[0]
    out, run = Outcomes(), Run()
    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_train_through_the_crash, cluster, trainer_id, trainer_key, run)
            await _drive(cluster, [key for _, key in tenants], out, run)
    assert run.killed == ["ledger", "executor"]
    # Everything computed reaches the ledger: wait until no journal holds an unacked event.
    with trio.fail_after(60):
        while True:
            events, unacked = _journal_events(cluster.home)
            if not unacked:
                break
            await trio.sleep(0.3)
    print(f"outcomes {dict(out.kinds)}; {len(events)} events journaled; job {run}")  # with -s
    assert sum(out.kinds.values()) == N_REQUESTS
    assert out.kinds["abandon_ok"] > 100 and out.kinds["plain_ok"] > 500, out.kinds
    assert sum(n for k, n in out.kinds.items() if k.startswith("deadline_")) > 50, out.kinds
    # Every answer a client got was billed: its (tokens, GPU time) is among the events.
    computed = Counter(
        (e.prompt_tokens, e.completion_tokens, e.gpu_ms)
        for e in events.values()
        if e.kind == "inference"
    )
    assert not (out.completed - computed), list((out.completed - computed).items())[:5]
    assert len(events) >= sum(out.completed.values()) + out.kinds["abandon_ok"] - CONCURRENCY
    assert sum(1 for e in events.values() if e.kind == "training") == training_events_expected()

    # The job: its steps in the journals, and what it reports.
    step_gpu_us = _check_training(cluster, run, trainer_id)
    per_step = trainable_params(cluster.model_dir, TRAIN_RANK, TRAIN_MODULES)
    job_gradients = per_step * TRAIN_STEPS  # distinct optimizer steps, a redone one once
    prices = Prices(granularity_ms=GRANULARITY_MS)
    job_cost = job_gradients * 0.05 / 1_000_000 * 2.0
    final = run.final
    assert final is not None and final.status == "succeeded", final
    assert final.step == final.total_steps == TRAIN_STEPS and final.attempt == 2, final
    assert final.result_version == 1, final
    assert final.gradients == job_gradients, (final.gradients, job_gradients)
    trained = [e for e in events.values() if e.kind == "training"]
    assert final.tokens == sum(e.prompt_tokens for e in trained), final
    # The job sums its cost step by step (floats): equal to the formula up to rounding.
    assert math.isclose(final.cost_usd, job_cost, rel_tol=1e-9), (final.cost_usd, job_cost)

    with ClusterState(cluster.redis_url) as state:
        for tenant_id, key in tenants:
            mine = [e for e in events.values() if e.tenant_id == tenant_id]
            inference = [e for e in mine if e.kind == "inference"]
            billed = sum(
                max(1, math.ceil(e.gpu_ms / GRANULARITY_MS)) * GRANULARITY_MS if e.gpu_ms > 0 else 0
                for e in inference
            )
            gradients = sum(e.gradients for e in mine if e.kind == "training")
            assert gradients == (job_gradients if tenant_id == trainer_id else 0)
            rows = state.usage.rows(tenant_id)
            assert sum(r.events for r in rows) == len(mine)
            assert sum(r.billed_ms for r in rows) == billed > 0
            # GPU time: the inference events', plus one computation of each training step
            # (which one, of a step computed twice, depends on which reached the ledger first).
            inference_us = sum(round(e.gpu_ms * 1000) for e in inference)
            gpu_us = sum(r.gpu_us for r in rows)
            if tenant_id == trainer_id:
                training_us = gpu_us - inference_us
                assert training_us in _sums_of_one_copy_each(list(step_gpu_us.values()))
            else:
                assert gpu_us == inference_us
            assert sum(r.prompt_tokens for r in rows) == sum(e.prompt_tokens for e in mine)
            assert sum(r.completion_tokens for r in rows) == sum(e.completion_tokens for e in mine)
            assert sum(r.gradients for r in rows) == gradients
            training_rows = [r for r in rows if r.kind == "training"]
            assert sum(r.events for r in training_rows) == len(mine) - len(inference)
            assert all(r.billed_ms == 0 for r in training_rows)  # billed by gradients only
            totals = state.usage.get(tenant_id)
            assert (totals.requests, totals.billed_ms) == (len(mine), billed)
            assert totals.gradients == gradients
            # The SDK's report and its invoice: the paper's formulas, computed here.
            async with AsyncClient(cluster.gateway, key) as c:
                report = await c.usage(group_by="kind", timeout_s=10)
            invoice = report.invoice(prices)
            assert invoice.total is not None
            expected_cost = billed * 2.0 / 3_600_000 * 0.3 + gradients * 0.05 / 1_000_000 * 2.0
            assert invoice.total.cost_usd == expected_cost
            if tenant_id == trainer_id:
                assert [line.label for line in invoice.lines] == ["inference", "training"]
                line = invoice.lines[1]
                assert (line.gradients, line.billed_ms) == (job_gradients, 0)
                assert line.cost_usd == job_cost
            else:
                assert [line.label for line in invoice.lines] == ["inference"]
            # The CLI's invoice says the same.
            cli = cluster.cli("usage", "--key", key, "--by", "kind", "--csv")
            assert cli.returncode == 0, cli.stderr
            *_, total = csv.reader(io.StringIO(cli.stdout))
            assert (total[0], int(total[1]), int(total[3])) == ("total", len(mine), billed)
    # The stream stayed bounded while every event was aggregated.
    with redis.Redis.from_url(cluster.redis_url, decode_responses=True) as raw:
        assert raw.xlen(keys.usage_events()) < len(events)
    # The crashes really happened, and were recovered from.
    log = cluster.full_log()
    victim = run.victim.replace("exec-", "executor-")
    assert "ledger exited with" in log and f"{victim} exited with" in log, log[-3000:]
