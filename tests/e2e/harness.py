"""Starting and stopping a real cluster (`vajra up` in a subprocess) for end-to-end tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

READY_LINE = "vajra: ready"


def vajra_env(home: Path) -> dict[str, str]:
    """This process's environment without any VAJRA_ variable, with VAJRA_HOME=home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAJRA_")}
    env["VAJRA_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class RunningCluster:
    home: Path
    model_dir: Path
    process: subprocess.Popen[str]
    info: dict[str, object]
    log_path: Path

    @property
    def gateway(self) -> str:
        return str(self.info["gateway_address"])

    @property
    def redis_url(self) -> str:
        return str(self.info["redis_url"])

    @property
    def config_path(self) -> Path:
        return self.home / "run" / "cluster.toml"

    def env(self) -> dict[str, str]:
        return vajra_env(self.home)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "vajra", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def create_tenant(self, name: str, *, timeout: float = 60) -> tuple[str, str]:
        """``vajra tenant create NAME`` (retried while the cluster's state is coming back);
        returns (tenant_id, api_key)."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.cli("tenant", "create", name)
            if out.returncode == 0:
                key = re.search(r"api key \(shown once\): (\S+)", out.stdout)
                tenant_id = re.search(r"\((t_[0-9a-f]+)\)", out.stdout)
                assert key and tenant_id, out.stdout
                return tenant_id.group(1), key.group(1)
            assert time.monotonic() < deadline, out.stderr
            time.sleep(0.5)

    def full_log(self) -> str:
        return self.log_path.read_text(errors="replace")


def launch_up(
    home: Path,
    model_dir: Path,
    log_path: Path,
    *,
    config: Path | None = None,
    args: Sequence[str] = ("--gateway-port", "0", "--executors", "1"),
    new_session: bool = False,
) -> subprocess.Popen[str]:
    """Start `vajra up` on ``home`` (created if needed), its output appended to ``log_path``.

    ``new_session``: run it as the leader of its own process group, as a shell runs a job,
    so a test can deliver a terminal's Ctrl-C to the whole group (:func:`interrupt_cluster`).
    """
    home.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "vajra", "up", "--model", str(model_dir), *args]
    if config is not None:
        argv[4:4] = ["--config", str(config)]
    with log_path.open("a") as log:
        return subprocess.Popen(
            argv,
            env=vajra_env(home),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=new_session,
        )


def wait_ready(
    process: subprocess.Popen[str], home: Path, log_path: Path, *, timeout: float = 180
) -> dict[str, object]:
    """Wait until the log shows `vajra: ready`; returns cluster.json."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vajra up exited early:\n{log_path.read_text()[-4000:]}")
        if READY_LINE in log_path.read_text(errors="replace"):
            info: dict[str, object] = json.loads((home / "cluster.json").read_text())
            return info
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"cluster not ready in {timeout:.0f} s:\n{log_path.read_text()[-4000:]}")


def start_cluster(
    tmp: Path,
    model_dir: Path,
    *,
    config_text: str = "",
    home: Path | None = None,
    args: Sequence[str] = ("--gateway-port", "0", "--executors", "1"),
    new_session: bool = False,
    log_name: str = "cluster.log",
) -> RunningCluster:
    """`vajra up` with ``config_text`` as its config file; returns once it printed ready."""
    if home is None:
        home = tmp / "home"
        home.mkdir()
    config = tmp / "vajra.toml"
    config.write_text(config_text)
    log_path = tmp / log_name
    log_path.touch()
    proc = launch_up(home, model_dir, log_path, config=config, args=args, new_session=new_session)
    info = wait_ready(proc, home, log_path)
    return RunningCluster(home, model_dir, proc, info, log_path)


def stop_cluster(cluster: RunningCluster) -> float:
    """SIGTERM the supervisor; returns how long it took to exit (it must exit 0)."""
    t0 = time.monotonic()
    cluster.process.send_signal(signal.SIGTERM)
    try:
        code = cluster.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        cluster.process.kill()
        raise
    elapsed = time.monotonic() - t0
    assert code == 0, cluster.log()
    return elapsed


def interrupt_cluster(cluster: RunningCluster, *, presses: int = 1) -> tuple[int, float]:
    """A terminal's Ctrl-C: SIGINT to the supervisor's whole process group (the cluster must
    have been started with ``new_session=True``), ``presses`` times. Returns (exit code,
    seconds to exit)."""
    pgid = os.getpgid(cluster.process.pid)
    assert pgid == cluster.process.pid, "start the cluster with new_session=True"
    t0 = time.monotonic()
    for i in range(presses):
        if i:
            time.sleep(0.3)
        os.killpg(pgid, signal.SIGINT)
    try:
        code = cluster.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        cluster.process.kill()
        raise
    return code, time.monotonic() - t0


def pgrep(pattern: str) -> list[int]:
    """Pids of the live processes whose command line contains ``pattern``."""
    out = subprocess.run(
        ["pgrep", "-f", "--", pattern], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split() if int(p) != os.getpid()]


def cluster_pids(home: Path) -> list[int]:
    """Every process of the cluster in ``home``: actors, the embedded Valkey, its reaper."""
    return pgrep(str(home))


def actor_pids(home: Path) -> list[int]:
    return pgrep(f"--config {home}/run/cluster.toml")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def wait_gone(pids: Iterable[int], timeout: float) -> tuple[list[int], float]:
    """Wait until none of ``pids`` runs; returns (those still running, seconds waited)."""
    pids = list(pids)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        left = [p for p in pids if alive(p)]
        if not left:
            return [], time.monotonic() - t0
        time.sleep(0.1)
    return [p for p in pids if alive(p)], time.monotonic() - t0


@contextmanager
def running_cluster(
    tmp: Path, model_dir: Path, *, config_text: str = ""
) -> Iterator[RunningCluster]:
    """:func:`start_cluster`, stopped (SIGTERM, exit 0) when the block ends."""
    cluster = start_cluster(tmp, model_dir, config_text=config_text)
    try:
        yield cluster
    finally:
        if cluster.process.poll() is None:
            stop_cluster(cluster)
