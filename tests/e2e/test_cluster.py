"""End to end: real actor processes started by `vajra up`, driven through the SDK and raw pyzmq.

Test rules: loopback only, every wait under `trio.fail_after` or a subprocess timeout.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import torch
import trio
import zmq
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.e2e.harness import RunningCluster
from tests.reference import transformers_greedy
from vajra.bus.codec import decode, encode
from vajra.bus.messages import (
    PROTOCOL_VERSION,
    ErrorReply,
    InferRequest,
    InferResult,
    LoadReport,
    Sampling,
    Structured,
)
from vajra.client import (
    AsyncClient,
    AuthError,
    Client,
    InvalidRequest,
    TimeoutError,
    UnavailableError,
    VajraError,
)
from vajra.state import ClusterState

pytestmark = pytest.mark.e2e

PROMPTS = [
    "The river",
    "Once upon a time there was",
    "numbers: 1 2 3",
    "A long and winding sentence about the weather in the mountains, which was",
    "hello",
    "Why is the sky",
    "x",
    "The quick brown fox jumps over the lazy dog.",
    "In the beginning",
    "tea or coffee?",
]


@pytest.fixture(scope="module")
def api_key(cluster: RunningCluster) -> str:
    return cluster.create_tenant("acme")[1]


def _reference_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    return transformers_greedy(model_dir, prompt, max_new_tokens)[0]


def _strip_eos(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


async def test_fifty_concurrent_requests_match_transformers_greedy(
    cluster: RunningCluster, api_key: str
) -> None:
    jobs = [(i, PROMPTS[i % len(PROMPTS)], 4 + (i * 7) % 13, i % 2 == 0) for i in range(50)]
    results: dict[int, list[int]] = {}
    texts: dict[int, str] = {}

    async def one(c: AsyncClient, i: int, prompt: str, n: int, stream: bool) -> None:
        if stream:
            pieces: list[str] = []
            tokens: list[int] = []
            async with c.stream(prompt, max_tokens=n) as chunks:
                async for ch in chunks:
                    pieces.append(ch.text)
                    tokens.extend(ch.token_ids)
            results[i] = tokens
            texts[i] = "".join(pieces)
        else:
            r = await c.infer(prompt, max_tokens=n)
            assert r.usage.completion_tokens == len(r.tokens)
            assert r.usage.prompt_tokens > 0
            results[i] = r.tokens
            texts[i] = r.text

    with trio.fail_after(120):
        async with (
            AsyncClient(cluster.gateway, api_key, timeout_s=90) as c,
            trio.open_nursery() as nursery,
        ):
            for job in jobs:
                nursery.start_soon(one, c, *job)

    tok = AutoTokenizer.from_pretrained(cluster.model_dir)
    reference = {(p, n): _reference_greedy(cluster.model_dir, p, n) for _, p, n, _ in jobs}
    for i, prompt, n, _ in jobs:
        want = _strip_eos(reference[(prompt, n)], tok.eos_token_id)
        assert results[i] == want, f"request {i} ({prompt!r}, {n} tokens) differs"
        assert texts[i] == tok.decode(want, skip_special_tokens=True)


async def test_usage_reaches_the_ledger_and_events_reach_the_predictor(
    cluster: RunningCluster, api_key: str
) -> None:
    with trio.fail_after(30):
        async with AsyncClient(cluster.gateway, api_key, timeout_s=20) as c:
            r = await c.infer("billing check", max_tokens=3)
    with ClusterState(cluster.redis_url) as state:
        tenant = state.api_keys.authenticate(api_key)
        assert tenant is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            usage = state.usage.get(tenant.tenant_id)
            # The predictor keys counts by tenant and adapter digest ("{tenant}/__base__").
            events = state.events.stats(f"{tenant.tenant_id}/__base__")
            if usage.requests >= 1 and events.requests >= 1:
                break
            await trio.sleep(0.1)
        assert usage.requests >= 1
        assert usage.completion_tokens >= r.usage.completion_tokens
        assert usage.gpu_ms > 0
        assert events.requests >= 1


def test_sync_client_and_cli(cluster: RunningCluster, api_key: str) -> None:
    with Client(cluster.gateway, api_key, timeout_s=30) as c:
        r = c.infer("hello", max_tokens=5)
        streamed = "".join(ch.text for ch in c.stream("hello", max_tokens=5))
    assert r.text == streamed
    out = cluster.cli("infer", "--key", api_key, "--max-tokens", "5", "hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == r.text
    status = cluster.cli("status")
    assert status.returncode == 0, status.stderr
    assert "exec-0" in status.stdout and "executors: 1" in status.stdout
    shown = cluster.cli("config", "show")
    assert "max_prompt_chars" in shown.stdout


def test_sync_client_pushes_bytes_with_their_metadata(
    cluster: RunningCluster, api_key: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from tests.reference import save_peft_adapters
    from vajra.client._adapter_files import read_adapter_dir

    (adapter,) = save_peft_adapters(tiny_model_dir, tmp_path, [2], seed=5)
    config_json, weights = read_adapter_dir(adapter)
    with Client(cluster.gateway, api_key, timeout_s=30) as c:
        info = c.push_adapter_bytes(
            config_json,
            weights,
            "sync-meta",
            metrics={"final_loss": 0.25},
            hyperparams={"lr": 0.001},
            dataset_digest="sha256:" + "a" * 64,
            activate=False,
        )
        assert info.version == 1 and info.metrics == {"final_loss": 0.25}
        assert info.hyperparams == {"lr": 0.001} and info.dataset_digest.endswith("a" * 64)
        assert not info.active  # staged, as asked
        with pytest.raises(InvalidRequest) as err:
            c.push_adapter_bytes(config_json, weights, "sync-meta", metrics={"x": float("nan")})
        assert err.value.field == "metrics"
        assert [v.version for v in c.versions("sync-meta")] == [1]


def test_merge_serves_the_exact_weighted_sum_of_two_versions(
    cluster: RunningCluster, api_key: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`vajra adapter merge` and the SDK's merge: the merged version answers exactly as PEFT's
    own ``cat`` combination of the two versions does; another tenant cannot merge them."""
    import copy as _copy

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.reference import transformers_greedy
    from vajra.client import NotFoundError

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    dirs = []
    for i, r in enumerate((2, 4)):
        torch.manual_seed(40 + i)
        cfg = LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        out = tmp_path / f"v{i + 1}"
        get_peft_model(_copy.deepcopy(base), cfg).save_pretrained(out)
        dirs.append(out)
    peft = PeftModel.from_pretrained(_copy.deepcopy(base), dirs[0], adapter_name="a")
    peft.load_adapter(dirs[1], adapter_name="b")
    peft.add_weighted_adapter(["a", "b"], [0.75, 0.5], "m", combination_type="cat")
    peft.save_pretrained(tmp_path / "peft", selected_adapters=["m"])
    expect, _ = transformers_greedy(tiny_model_dir, "The river", 8, tmp_path / "peft" / "m")
    with Client(cluster.gateway, api_key, timeout_s=60) as c:
        for d in dirs:
            c.push_adapter(d, "blend")
        merged = c.merge("blend", (1, 2), (0.75, 0.5))
        assert (merged.version, merged.rank, merged.source) == (3, 6, "merge")
        assert merged.active and merged.parent_version == 1
        assert merged.hyperparams == {"merged_versions": [1, 2], "merge_weights": [0.75, 0.5]}
        got = c.infer("The river", adapter="blend@3", max_tokens=8, temperature=0.0)
        assert got.tokens[: len(expect)] == expect[: len(got.tokens)] and got.tokens
        assert c.infer("The river", adapter="blend", max_tokens=8).tokens == got.tokens
        with pytest.raises(NotFoundError):
            c.merge("blend", (1, 9), (0.5, 0.5))
        with pytest.raises(InvalidRequest) as err:
            c.merge("blend", (1, 2), (0.0, 0.0))
        assert err.value.field == "weights"
    _, other_key = cluster.create_tenant("merge-other")
    with Client(cluster.gateway, other_key, timeout_s=30) as c, pytest.raises(NotFoundError):
        c.merge("blend", (1, 2))
    out = cluster.cli(
        "adapter",
        "merge",
        "blend",
        "1",
        "2",
        "--weights",
        "1,-1",
        "--staged",
        "--key",
        api_key,
        "--json",
    )
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert (shown["version"], shown["active"], shown["staged"]) == (4, False, True)
    bad = cluster.cli("adapter", "merge", "blend", "1", "2", "--weights", "x", "--key", api_key)
    assert bad.returncode != 0 and "weights" in bad.stderr


async def test_bad_requests_get_typed_errors_naming_the_field(
    cluster: RunningCluster, api_key: str
) -> None:
    with trio.fail_after(30):
        async with AsyncClient(cluster.gateway, "vk_not-a-real-key", timeout_s=10) as bad:
            with pytest.raises(AuthError):
                await bad.infer("hello")
        async with AsyncClient(cluster.gateway, api_key, tenant="nobody", timeout_s=10) as c:
            with pytest.raises(InvalidRequest) as info:
                await c.infer("hello")
            assert info.value.field == "tenant"
        async with AsyncClient(cluster.gateway, api_key, timeout_s=10) as c:
            for kwargs, field in [
                ({"prompt": ""}, "prompt"),
                ({"prompt": "x" * 2001}, "prompt"),
                ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
                ({"prompt": "hi", "max_tokens": 100_000}, "max_tokens"),
                ({"prompt": "hi", "temperature": -1.0}, "temperature"),
                ({"prompt": "hi", "top_p": 0.0}, "top_p"),
            ]:
                with pytest.raises(InvalidRequest) as info:
                    await c.infer(**kwargs)  # type: ignore[arg-type]
                assert info.value.field == field, kwargs
            # The gateway is still serving.
            assert (await c.infer("still alive", max_tokens=2)).tokens


def test_the_gateway_checks_requests_itself_not_only_the_sdk(
    cluster: RunningCluster, api_key: str
) -> None:
    """The SDK refuses these before sending; raw frames reach the gateway's own checks."""
    cases: list[tuple[dict[str, object], str]] = [
        ({"sampling": Sampling(max_tokens=0)}, "max_tokens"),
        ({"sampling": Sampling(max_tokens=100_000)}, "max_tokens"),
        ({"sampling": Sampling(temperature=-1.0)}, "temperature"),
        ({"sampling": Sampling(temperature=float("nan"))}, "temperature"),
        ({"sampling": Sampling(top_p=0.0)}, "top_p"),
        ({"sampling": Sampling(stop=("",))}, "stop"),
        ({"sampling": Sampling(seed=-1)}, "seed"),
        ({"sampling": Sampling(top_k=-2)}, "top_k"),
        ({"sampling": Sampling(logprobs=99)}, "logprobs"),
        ({"sampling": Sampling(structured=Structured("json_schema", "[1"))}, "response_format"),
        ({"deadline_ms": 0}, "deadline_ms"),
        ({"adapter": "x" * 200}, "adapter"),
    ]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.gateway)
    try:
        for i, (fields, field) in enumerate(cases):
            request = InferRequest(request_id=f"bad{i}", api_key=api_key, prompt="hi", **fields)  # type: ignore[arg-type]
            sock.send_multipart(encode(request))
            assert sock.poll(30_000), fields
            reply = decode(sock.recv_multipart()).message
            assert isinstance(reply, ErrorReply), fields
            assert (reply.code, reply.field) == ("invalid_request", field), fields
    finally:
        sock.close()
        ctx.term()


def _random_frames(rng: random.Random, i: int) -> list[bytes]:
    header = msgpack.packb([PROTOCOL_VERSION, "infer", f"m{i}", None, None])
    good_body = msgpack.packb({"request_id": f"r{i}", "api_key": "k", "prompt": "p"})
    choices = [
        lambda: [rng.randbytes(rng.randint(0, 40))],
        lambda: [rng.randbytes(8), rng.randbytes(rng.randint(0, 64))],
        lambda: [header],
        lambda: [header, rng.randbytes(rng.randint(1, 32))],
        lambda: [msgpack.packb([99, "infer", "m", None, None]), good_body],
        lambda: [msgpack.packb([PROTOCOL_VERSION, "nope", "m", None, None]), good_body],
        lambda: [header, msgpack.packb({"request_id": f"r{i}", "api_key": 5, "prompt": "p"})],
        lambda: [header, msgpack.packb({"request_id": f"r{i}"})],
        lambda: [header, msgpack.packb([1, 2, 3])],
        lambda: [header, good_body, b"extra"],
        lambda: encode(LoadReport(executor_id="e", incarnation="i", queue_depth=0, running=0)),
        lambda: [b""],
    ]
    return rng.choice(choices)()


def test_a_thousand_malformed_frames_are_each_answered(
    cluster: RunningCluster, api_key: str
) -> None:
    rng = random.Random(1234)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.gateway)
    try:
        with Client(cluster.gateway, api_key, timeout_s=10) as c:
            before = c.stats().get("malformed_frames", 0)
        for i in range(1000):
            sock.send_multipart(_random_frames(rng, i))
        replies = 0
        deadline = time.monotonic() + 30
        while replies < 1000 and time.monotonic() < deadline:
            if sock.poll(1000):
                env = decode(sock.recv_multipart())
                assert isinstance(env.message, ErrorReply)
                replies += 1
        assert replies == 1000
        with Client(cluster.gateway, api_key, timeout_s=10) as c:
            after = c.stats().get("malformed_frames", 0)
        assert after - before == 1000
        # ... and it still serves a valid request, on the very same connection.
        sock.send_multipart(
            encode(
                InferRequest(
                    request_id="ok",
                    api_key=api_key,
                    prompt="hello",
                    sampling=Sampling(max_tokens=2),
                )
            )
        )
        assert sock.poll(30_000)
        assert isinstance(decode(sock.recv_multipart()).message, InferResult)
    finally:
        sock.close()
        ctx.term()


def _peft_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(
        r=4 + 4 * (seed % 3),
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj"],
        init_lora_weights=False,
    )
    get_peft_model(base, cfg).save_pretrained(out)
    return out


def _peft_greedy(model_dir: Path, adapter: Path, prompt: str, n: int) -> list[int]:
    return _strip_eos(*transformers_greedy(model_dir, prompt, n, adapter))


async def test_hot_swap_under_load_never_fails_or_mixes_versions(
    cluster: RunningCluster, api_key: str, tmp_path: Path
) -> None:
    """Clients stream while one adapter name gets 100 new versions; every answer is whole."""
    prompt, n = "Once upon a time", 6
    dirs = [_peft_adapter(cluster.model_dir, tmp_path / f"v{i}", seed=10 + i) for i in range(4)]
    outputs = [_peft_greedy(cluster.model_dir, d, prompt, n) for d in dirs]
    assert len({tuple(o) for o in outputs}) == 4, "the test adapters must be told apart"
    seen: list[int] = []
    failures: list[str] = []
    pushed = 0

    async def client_loop(c: AsyncClient, stop: trio.Event, i: int) -> None:
        while not stop.is_set():
            try:
                if i % 2:
                    tokens: list[int] = []
                    async with c.stream(prompt, adapter="swap", max_tokens=n) as chunks:
                        async for ch in chunks:
                            tokens.extend(ch.token_ids)
                else:
                    tokens = (await c.infer(prompt, adapter="swap", max_tokens=n)).tokens
            except VajraError as exc:
                failures.append(repr(exc))
                continue
            tokens = _strip_eos(tokens, 2)
            if tokens in outputs:
                seen.append(outputs.index(tokens))
            else:
                failures.append(f"mixed or unknown output {tokens}")

    with trio.fail_after(240):
        async with AsyncClient(cluster.gateway, api_key, timeout_s=60) as c:
            first = await c.push_adapter(dirs[0], "swap")
            assert first.version >= 1
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(client_loop, c, stop, i)
                for k in range(1, 101):
                    info = await c.push_adapter(dirs[k % 4], "swap")
                    assert info.version == first.version + k
                    pushed += 1
                    await trio.sleep(0.05)
                stop.set()
    assert pushed == 100
    assert not failures, failures[:5]
    assert len(seen) >= 8 and len(set(seen)) >= 2, seen


def _executor_pids(cluster: RunningCluster) -> list[str]:
    out = subprocess.run(
        ["pgrep", "-f", f"actor executor --config {cluster.home}/run/cluster.toml"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.split()


async def test_killed_executor_is_restarted_and_no_request_hangs(
    cluster: RunningCluster, api_key: str
) -> None:
    (pid,) = _executor_pids(cluster)
    outcomes: list[str] = []
    deadline_s = 20.0
    killed = trio.Event()

    def kill_once() -> None:
        if not killed.is_set():
            os.kill(int(pid), signal.SIGKILL)
            killed.set()

    async def one(c: AsyncClient, i: int) -> None:
        t0 = trio.current_time()
        prompt = PROMPTS[i % len(PROMPTS)]
        try:
            if i % 2:
                # The kill comes from inside a stream that has read a few of its 200 tokens
                # (no end-of-sequence stop), so at least that stream is cut short, however
                # fast the machine generates.
                async with c.stream(prompt, max_tokens=200, ignore_eos=True) as chunks:
                    read = 0
                    async for chunk in chunks:
                        read += len(chunk.token_ids)
                        if read >= 4:
                            kill_once()
            else:
                await c.infer(prompt, max_tokens=200, ignore_eos=True)
            outcomes.append("ok")
        except (UnavailableError, TimeoutError) as exc:
            assert exc.retriable
            outcomes.append(type(exc).__name__)
        except VajraError as exc:  # any other error is a bug
            outcomes.append(f"unexpected {exc!r}")
        assert trio.current_time() - t0 <= deadline_s + 2.0

    with trio.fail_after(60):
        async with (
            AsyncClient(cluster.gateway, api_key, timeout_s=deadline_s) as c,
            trio.open_nursery() as nursery,
        ):
            for i in range(30):
                nursery.start_soon(one, c, i)
    assert killed.is_set()
    assert len(outcomes) == 30
    assert not [o for o in outcomes if o.startswith("unexpected")], outcomes
    assert any(o != "ok" for o in outcomes), "the kill should have cut some requests short"

    # The supervisor restarts the executor and service resumes.
    with trio.fail_after(90):
        while True:
            pids = _executor_pids(cluster)
            if pids and pids != [pid]:
                break
            await trio.sleep(0.2)
        async with AsyncClient(cluster.gateway, api_key, timeout_s=10) as c:
            while True:
                try:
                    r = await c.infer("back again", max_tokens=3)
                    break
                except (UnavailableError, TimeoutError):
                    await trio.sleep(0.3)
    assert r.tokens
