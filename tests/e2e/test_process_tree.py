"""End to end: the process tree of `vajra up` — who dies with whom, who restarts what, secrets.

Each test drives real `vajra up` processes (tests/e2e/harness.py) on free loopback ports and a
temporary VAJRA_HOME, and checks processes by pid and by command line (pgrep), never by name.

Test rules: loopback only; every wait bounded (subprocess timeouts, polling deadlines).
The tests of the module cluster run in file order; the last one stops it with Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e.harness import (
    RunningCluster,
    actor_pids,
    alive,
    cluster_pids,
    interrupt_cluster,
    launch_up,
    start_cluster,
    stop_cluster,
    vajra_env,
    wait_gone,
    wait_ready,
)
from vajra.state import ClusterState

pytestmark = pytest.mark.e2e

CONFIG = "[http]\nenabled = false\n"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _infer_until_ok(cluster: RunningCluster, key: str, *, timeout: float) -> float:
    """`vajra infer` until it answers; returns how long that took."""
    t0 = time.monotonic()
    while True:
        out = cluster.cli("infer", "--key", key, "--max-tokens", "3", "--timeout", "10", "hello")
        if out.returncode == 0:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"no answer in {timeout}s: {out.stderr}"
        time.sleep(0.5)


def _valkey_record(home: Path) -> dict[str, object]:
    record: dict[str, object] = json.loads((home / "run" / "valkey.pid").read_text())
    return record


def _up(home: Path, *args: str, timeout: float = 90) -> tuple[int, str, float]:
    """Run `vajra up ARGS` to completion; (exit code, its output, seconds)."""
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "vajra", "up", *args],
        env=vajra_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return out.returncode, out.stdout + out.stderr, time.monotonic() - t0


@pytest.fixture(scope="module")
def tree(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningCluster]:
    """A cluster whose supervisor leads its own process group (for the Ctrl-C test)."""
    tmp = tmp_path_factory.mktemp("tree")
    c = start_cluster(tmp, tiny_model_dir, config_text=CONFIG, new_session=True)
    try:
        yield c
    finally:
        if c.process.poll() is None:
            stop_cluster(c)
        leftovers, _ = wait_gone(cluster_pids(c.home), timeout=10.0)
        assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture(scope="module")
def acme_key(tree: RunningCluster) -> str:
    return tree.create_tenant("acme")[1]


def test_secrets_are_owner_only_and_valkey_demands_the_password(
    tree: RunningCluster, acme_key: str
) -> None:
    home = tree.home
    assert _mode(home / "run") == 0o700
    assert _mode(home / "valkey") == 0o700
    for path in (
        home / "run" / "cluster.toml",  # the admin key, the Redis URL with its password
        home / "cluster.json",  # the Redis URL with its password
        home / "valkey" / "password",
        home / "valkey" / "valkey.conf",  # requirepass
        home / "run" / "valkey.pid",
        home / "run" / "lock",
    ):
        assert _mode(path) == 0o600, path
    password = (home / "valkey" / "password").read_text().strip()
    assert len(password) >= 32
    url = urlsplit(tree.redis_url)
    assert url.password == password and url.hostname == "127.0.0.1"
    # An unauthenticated client is refused.
    assert url.port is not None
    with socket.create_connection(("127.0.0.1", url.port), timeout=5) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert sock.recv(64).startswith(b"-NOAUTH")
    # The password is in no printed or logged line; the printed URL is masked.
    log = tree.full_log()
    assert password not in log
    assert f"vajra: redis redis://:***@127.0.0.1:{url.port}" in log
    status = tree.cli("status")
    assert status.returncode == 0 and password not in status.stdout + status.stderr


def test_second_up_on_the_gateway_port_fails_fast_with_one_line(
    tree: RunningCluster, acme_key: str, tmp_path: Path
) -> None:
    port = str(urlsplit(tree.gateway).port)
    code, output, took = _up(
        tmp_path / "other-home", "--config", _config(tmp_path), "--gateway-port", port
    )
    assert code != 0
    assert took < 30, f"took {took:.1f}s"
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "gateway port" in lines[0] and "in use" in lines[0] and port in lines[0]
    assert "vajra: ready" not in output
    # The first cluster was not disturbed.
    _infer_until_ok(tree, acme_key, timeout=30)


def test_second_up_on_the_same_home_fails_fast_and_steals_nothing(
    tree: RunningCluster, acme_key: str, tmp_path: Path
) -> None:
    sockets = {p.name: p.stat().st_ino for p in (tree.home / "run").glob("*.sock")}
    assert sockets
    code, output, took = _up(tree.home, "--config", _config(tmp_path), "--gateway-port", "0")
    assert code != 0
    assert took < 30, f"took {took:.1f}s"
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "already running" in lines[0] and str(tree.process.pid) in lines[0]
    assert "vajra: ready" not in output
    assert {p.name: p.stat().st_ino for p in (tree.home / "run").glob("*.sock")} == sockets
    assert json.loads((tree.home / "cluster.json").read_text())["supervisor_pid"] == (
        tree.process.pid
    )
    _infer_until_ok(tree, acme_key, timeout=30)


def test_killed_valkey_is_restarted_on_its_port_with_its_data(
    tree: RunningCluster, acme_key: str
) -> None:
    before = _valkey_record(tree.home)
    old_pid = int(str(before["pid"]))
    time.sleep(1.2)  # past one appendfsync period, although a process crash loses nothing
    os.kill(old_pid, signal.SIGKILL)

    # The supervisor starts a new server on the same port, with the same configuration.
    deadline = time.monotonic() + 30
    while True:
        record = _valkey_record(tree.home) if (tree.home / "run" / "valkey.pid").exists() else {}
        if record.get("pid") not in (None, old_pid) and alive(int(str(record["pid"]))):
            break
        assert time.monotonic() < deadline, tree.log()
        time.sleep(0.1)
    assert record["config"] == before["config"]
    # A tenant created now must reach the restarted server, and so must the gateway's lookup
    # of its key: both succeed again within a bounded time.
    beta_key = tree.create_tenant("beta", timeout=30)[1]
    took = _infer_until_ok(tree, beta_key, timeout=30)
    assert took < 30
    # What was written before the kill is still there (the append-only file was replayed).
    with ClusterState(tree.redis_url) as state:
        acme = state.api_keys.authenticate(acme_key)
        assert acme is not None and acme.name == "acme"
    assert "embedded valkey restarted on port" in tree.full_log()


def test_ctrl_c_stops_in_order_and_valkey_last(tree: RunningCluster) -> None:
    start = len(tree.full_log())
    pids = cluster_pids(tree.home)
    assert pids
    code, took = interrupt_cluster(tree, presses=2)  # an impatient second Ctrl-C changes nothing
    assert code == 0, tree.log()
    assert took < 20
    shutdown = tree.full_log()[start:]
    order = ["stopped gateway", "stopped ledger", "stopped embedded valkey"]
    positions = [shutdown.find(line) for line in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), shutdown
    for bad in ("heartbeat not written", "Connection refused", "unreachable", "Traceback"):
        assert bad not in shutdown, shutdown
    left, _ = wait_gone(pids, timeout=5.0)
    assert not left, f"still running after Ctrl-C: {left}"
    assert not (tree.home / "cluster.json").exists()


def test_kill_9_of_the_supervisor_takes_every_process_down_and_the_home_restarts(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    first = start_cluster(tmp_path, tiny_model_dir, config_text=CONFIG, log_name="first.log")
    second: subprocess.Popen[str] | None = None
    try:
        key = first.create_tenant("acme")[1]
        actors = actor_pids(first.home)
        assert len(actors) == 5, actors  # ledger, scheduler, predictor, one executor, gateway
        everything = cluster_pids(first.home)  # + the embedded Valkey and its reaper
        valkey_record = first.home / "run" / "valkey.pid"
        valkey_pid = int(str(_valkey_record(first.home)["pid"])) if valkey_record.exists() else 0

        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        # A new `vajra up` on the same home at once: it must wait for the leftovers (not take
        # over their sockets), then start and serve.
        second_log = tmp_path / "second.log"
        second_log.touch()
        second = launch_up(
            first.home,
            tiny_model_dir,
            second_log,
            config=tmp_path / "vajra.toml",
            args=("--gateway-port", "0", "--executors", "1"),
        )
        left, took = wait_gone(actors, timeout=15.0)
        assert not left, f"actors outlived their supervisor by {took:.1f}s: {left}"
        assert valkey_pid in everything and len(everything) == 7, everything
        left, _ = wait_gone(everything, timeout=30.0)
        assert not left, f"the old Valkey or its reaper outlived the supervisor: {left}"
        info = wait_ready(second, first.home, second_log)
        restarted = RunningCluster(first.home, tiny_model_dir, second, info, second_log)
        assert info["supervisor_pid"] == second.pid
        assert not set(cluster_pids(first.home)) & set(everything)
        # The data of the first run is still there, and the new cluster serves it.
        _infer_until_ok(restarted, key, timeout=60)
        stop_cluster(restarted)
        left, _ = wait_gone(cluster_pids(first.home), timeout=10.0)
        assert not left
    finally:
        for proc in (first.process, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)


def _config(tmp_path: Path) -> str:
    path = tmp_path / "second.toml"
    path.write_text(CONFIG)
    return str(path)
