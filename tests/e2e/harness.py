"""Starting and stopping a real cluster (`vajra up` in a subprocess) for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


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

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VAJRA_")}
        env["VAJRA_HOME"] = str(self.home)
        return env

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


def start_cluster(tmp: Path, model_dir: Path, *, config_text: str = "") -> RunningCluster:
    home = tmp / "home"
    home.mkdir()
    config = tmp / "vajra.toml"
    config.write_text(config_text)
    log_path = tmp / "cluster.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAJRA_")}
    env["VAJRA_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vajra",
            "up",
            "--config",
            str(config),
            "--model",
            str(model_dir),
            "--gateway-port",
            "0",
            "--executors",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vajra up exited early:\n{log_path.read_text()[-4000:]}")
        if "vajra: ready" in log_path.read_text(errors="replace"):
            info = json.loads((home / "cluster.json").read_text())
            return RunningCluster(home, model_dir, proc, info, log_path)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"cluster not ready in 180 s:\n{log_path.read_text()[-4000:]}")


def stop_cluster(cluster: RunningCluster) -> float:
    """SIGTERM the supervisor; returns how long it took to exit (it must exit 0)."""
    t0 = time.monotonic()
    cluster.process.send_signal(signal.SIGTERM)
    try:
        code = cluster.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        cluster.process.kill()
        raise
    elapsed = time.monotonic() - t0
    assert code == 0, cluster.log()
    return elapsed
