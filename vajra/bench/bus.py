"""``vajra bench bus``: the request path's own cost, measured end to end.

Starts a real cluster (the supervisor, every actor as its own process, an embedded Valkey)
with the null model — executors that answer at once without compute — and drives it through
the gateway's ZeroMQ socket:

* throughput: ``concurrency`` requests kept outstanding for ``duration_s``;
* latency: ``latency_requests`` sent one at a time (p50/p99 of a single outstanding request).

The same load generator then drives a raw pyzmq ROUTER echo server (:mod:`vajra.bus.echo`) in
another process, with the same frames, so the result carries its own ceiling measured on the
same machine.

Where the time goes: the CPU time each process of the cluster used during the throughput run,
divided by the requests answered (``cpu_us_per_request``; ``load_generator`` is this process).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import trio

from vajra.actors.supervisor import Supervisor, free_tcp_address
from vajra.bus.client_socket import BlockingContext
from vajra.bus.codec import decode, encode
from vajra.bus.messages import InferRequest, InferResult, Sampling
from vajra.config import VajraConfig, load_config
from vajra.state import ClusterState

#: How long the load generator waits for any reply before it gives up.
_REPLY_WAIT_S = 5.0


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


class _Load:
    """A blocking load generator (one DEALER, requests pipelined)."""

    def __init__(self, address: str, api_key: str, *, check_results: bool) -> None:
        self.ctx = BlockingContext()
        self.sock = self.ctx.dealer(address, monitored=False)
        self.api_key = api_key
        self.check_results = check_results
        self.errors = 0

    def close(self) -> None:
        self.sock.close()
        self.ctx.close()

    def _frames(self, rid: str) -> list[bytes]:
        req = InferRequest(
            request_id=rid, api_key=self.api_key, prompt="ping", sampling=Sampling(max_tokens=1)
        )
        return encode(req, message_id=rid)

    def _check(self, frames: list[bytes]) -> str:
        env = decode(frames)
        msg = env.message
        if self.check_results and not isinstance(msg, InferResult):
            self.errors += 1
        rid = getattr(msg, "request_id", "")
        return rid if isinstance(rid, str) else ""

    def throughput(self, concurrency: int, duration_s: float) -> dict[str, float]:
        sent: dict[str, float] = {}
        latencies: list[float] = []
        seq = 0
        start = time.perf_counter()
        end = start + duration_s
        done = 0
        while True:
            now = time.perf_counter()
            if now < end:
                while len(sent) < concurrency:
                    seq += 1
                    rid = f"b{seq}"
                    sent[rid] = time.perf_counter()
                    self.sock.send(self._frames(rid))
            elif not sent:
                break
            frames, _ = self.sock.receive(time.monotonic() + _REPLY_WAIT_S)
            if frames is None:
                raise RuntimeError(f"no reply for 5 s with {len(sent)} outstanding")
            while frames is not None:
                t0 = sent.pop(self._check(frames), None)
                if t0 is not None:
                    latencies.append(time.perf_counter() - t0)
                    done += 1
                frames = self.sock.recv_nowait()
        elapsed = time.perf_counter() - start
        latencies.sort()
        return {
            "requests": done,
            "seconds": elapsed,
            "requests_per_s": done / elapsed,
            "p50_ms": _percentile(latencies, 0.50) * 1e3,
            "p99_ms": _percentile(latencies, 0.99) * 1e3,
        }

    def latency(self, n: int) -> dict[str, float]:
        latencies: list[float] = []
        for i in range(n):
            rid = f"l{i}"
            t0 = time.perf_counter()
            self.sock.send(self._frames(rid))
            while True:
                frames, _ = self.sock.receive(time.monotonic() + _REPLY_WAIT_S)
                if frames is None:
                    raise RuntimeError("no reply for 5 s")
                if self._check(frames) == rid:
                    break
            latencies.append(time.perf_counter() - t0)
        latencies.sort()
        return {
            "p50_ms": _percentile(latencies, 0.50) * 1e3,
            "p99_ms": _percentile(latencies, 0.99) * 1e3,
            "mean_ms": sum(latencies) / len(latencies) * 1e3,
        }


def _process_name(proc: psutil.Process) -> str:
    """An actor's name (``vajra actor NAME``), else the program's."""
    argv = proc.cmdline()
    if "actor" in argv and argv.index("actor") + 1 < len(argv):
        return argv[argv.index("actor") + 1]
    # Some servers rewrite their argv as one string ("valkey-server 127.0.0.1:PORT").
    return Path(argv[0]).name.split(" ")[0] if argv else proc.name()


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process (the load generator) and each one under it."""
    me = psutil.Process()
    used: dict[str, float] = {}
    t = me.cpu_times()
    used["load_generator"] = t.user + t.system
    for child in me.children(recursive=True):
        try:
            with child.oneshot():
                t = child.cpu_times()
                name = _process_name(child)
                used[name] = used.get(name, 0.0) + t.user + t.system
        except psutil.Error:  # gone meanwhile
            continue
    return used


def _run_cluster_in_thread(
    home: Path,
    *,
    model: str = "null",
    tune: Callable[[VajraConfig], VajraConfig] | None = None,
    start_timeout_s: float = 120.0,
) -> tuple[dict[str, Any], trio.lowlevel.TrioToken, threading.Thread]:
    """A cluster of one executor serving ``model`` under a supervisor in a thread of its own:
    (its ready dict with ``info`` and ``stop``, the thread's Trio token, the thread). ``tune``
    changes the benchmark's configuration further."""
    env = {"VAJRA_HOME": str(home)}
    cfg = (
        load_config(env=env)
        .replace("cluster", gateway_address=free_tcp_address())
        .replace("http", enabled=False)  # the bridge is not on this path; keep its CPU out
        # One tenant drives the whole load: per-tenant limits would measure themselves.
        .replace("gateway", tenant_rate_limit_per_s=0.0, tenant_max_inflight=0)
    )
    if tune is not None:
        cfg = tune(cfg)
    sup = Supervisor(cfg, executors=1, model=model)
    ready: dict[str, Any] = {}
    started = threading.Event()
    stop = trio.Event()

    async def main() -> None:
        ready["token"] = trio.lowlevel.current_trio_token()
        ready["stop"] = stop
        async with trio.open_nursery() as nursery:
            ready["info"] = await nursery.start(sup.run)
            started.set()
            await stop.wait()
            nursery.cancel_scope.cancel()

    def runner() -> None:
        try:
            trio.run(main)
        finally:
            started.set()

    thread = threading.Thread(target=runner, name="vajra-bench-cluster", daemon=True)
    thread.start()
    if not started.wait(start_timeout_s) or "info" not in ready:
        raise RuntimeError("the benchmark cluster did not start")
    return ready, ready["token"], thread


@contextlib.contextmanager
def bench_cluster(home: Path, *, model: str = "null") -> Iterator[tuple[str, str]]:
    """A benchmark cluster (:func:`_run_cluster_in_thread`) and a new tenant to drive it:
    yields (gateway address, the tenant's API key); the cluster stops on exit."""
    ready, token, thread = _run_cluster_in_thread(home, model=model)
    try:
        with ClusterState(ready["info"]["redis_url"]) as state:
            _, api_key = state.tenants.create(f"bench-{uuid.uuid4().hex[:8]}")
        yield str(ready["info"]["gateway_address"]), api_key
    finally:
        trio.from_thread.run_sync(ready["stop"].set, trio_token=token)
        thread.join(60)


def run_bus_bench(
    *, duration_s: float = 5.0, concurrency: int = 256, latency_requests: int = 2000
) -> dict[str, Any]:
    """Run both measurements and return the JSON-ready result."""
    with (
        tempfile.TemporaryDirectory(prefix="vajra-bench-") as tmp,
        bench_cluster(Path(tmp)) as (address, api_key),
    ):
        load = _Load(address, api_key, check_results=True)
        try:
            load.latency(200)  # warm-up: caches, connections
            cpu_before = _cpu_seconds()
            e2e_tp = load.throughput(concurrency, duration_s)
            cpu_after = _cpu_seconds()
            cpu_used = {n: s - cpu_before.get(n, 0.0) for n, s in cpu_after.items()}
            e2e_lat = load.latency(latency_requests)
            errors = load.errors
        finally:
            load.close()

    address = free_tcp_address()
    echo = subprocess.Popen(
        [sys.executable, "-m", "vajra.bus.echo", address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert echo.stdout is not None
        echo.stdout.readline()
        raw = _Load(address, "vk_raw", check_results=False)
        try:
            raw.latency(200)
            raw_tp = raw.throughput(concurrency, duration_s)
            raw_lat = raw.latency(latency_requests)
        finally:
            raw.close()
    finally:
        echo.kill()
        echo.wait()

    return {
        "benchmark": "bus",
        "path": "client -> gateway -> scheduler -> executor(null model) -> gateway -> client",
        "requests_per_s": round(e2e_tp["requests_per_s"], 1),
        "p50_ms": round(e2e_lat["p50_ms"], 3),
        "p99_ms": round(e2e_lat["p99_ms"], 3),
        "throughput_p50_ms": round(e2e_tp["p50_ms"], 3),
        "throughput_p99_ms": round(e2e_tp["p99_ms"], 3),
        "errors": errors,
        "raw_requests_per_s": round(raw_tp["requests_per_s"], 1),
        "raw_p50_ms": round(raw_lat["p50_ms"], 3),
        "raw_p99_ms": round(raw_lat["p99_ms"], 3),
        "ratio_to_raw": round(e2e_tp["requests_per_s"] / raw_tp["requests_per_s"], 3),
        "cpu_us_per_request": {
            name: round(seconds / max(1, e2e_tp["requests"]) * 1e6, 1)
            for name, seconds in sorted(cpu_used.items(), key=lambda kv: -kv[1])
        },
        "conditions": {
            "concurrency": concurrency,
            "duration_s": duration_s,
            "latency_requests": latency_requests,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "transport": "tcp loopback to the gateway; ipc between actors",
        },
    }
