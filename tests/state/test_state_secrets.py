"""Secrets around the cluster state: the embedded Valkey's password and files, errors that
reach clients without an address, and servers left behind that are stopped only if ours.

Rules: loopback only; real Valkey processes, started here and stopped here by pid; every
wait bounded.
"""

from __future__ import annotations

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
import redis

from vajra.errors import InternalError, UnavailableError, VajraError
from vajra.state import ClusterState, EmbeddedValkey, keys, redact_secrets, redact_url
from vajra.state.reaper import (
    reaper_command,
    record_server,
    stop_recorded_server,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _no_address(exc: VajraError, url: str) -> None:
    parts = urlsplit(url)
    text = str(exc)
    for secret in (url, f"{parts.hostname}:{parts.port}", str(parts.port), "redis://"):
        assert secret not in text, text
    if parts.password:
        assert parts.password not in text


# --- the embedded server ------------------------------------------------------------------------


def test_embedded_valkey_has_a_private_password_and_refuses_strangers(tmp_path: Path) -> None:
    data = tmp_path / "v"
    with EmbeddedValkey(data) as server:
        parts = urlsplit(server.url)
        assert parts.password == server.password and len(server.password) >= 32
        assert server.password not in server.redacted_url and ":***@" in server.redacted_url
        assert server.password not in repr(server)
        assert _mode(data) == 0o700
        assert _mode(data / "password") == 0o600
        assert _mode(data / "valkey.conf") == 0o600
        assert parts.port is not None
        with socket.create_connection(("127.0.0.1", parts.port), timeout=5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert sock.recv(64).startswith(b"-NOAUTH")
        with ClusterState(server.url) as cs:
            cs.ping()
        password = server.password
    # One password per data directory: the same after a restart.
    again = EmbeddedValkey(data)
    assert again.password == password


def test_wrong_password_is_unavailable_without_secrets(tmp_path: Path) -> None:
    with EmbeddedValkey(tmp_path / "v") as server:
        parts = urlsplit(server.url)
        wrong = server.url.replace(server.password, "not-the-password")
        with (
            ClusterState(wrong, socket_timeout_s=1, socket_connect_timeout_s=1) as cs,
            pytest.raises(UnavailableError) as info,
        ):
            cs.ping()
        _no_address(info.value, wrong)
        assert "not-the-password" not in str(info.value)
        assert parts.password not in str(info.value)


def test_redaction() -> None:
    assert redact_url("redis://:s3cret@127.0.0.1:1") == "redis://:***@127.0.0.1:1"
    assert redact_url("redis://u:s3cret@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://h:1") == "redis://h:1"
    line = "vajra: redis redis://:s3cret@127.0.0.1:6379 and rediss://u:p@x:1 ok"
    assert (
        redact_secrets(line) == "vajra: redis redis://:***@127.0.0.1:6379 and rediss://u:***@x:1 ok"
    )


# --- errors that reach clients ---------------------------------------------------------------


def test_state_errors_carry_no_address(
    stopped_url: str, valkey_url: str, raw: redis.Redis[str], caplog: pytest.LogCaptureFixture
) -> None:
    with ClusterState(stopped_url, socket_timeout_s=0.5, socket_connect_timeout_s=0.5) as cs:
        with pytest.raises(UnavailableError) as info:
            cs.api_keys.authenticate("vk_whatever")
        _no_address(info.value, stopped_url)
    port = urlsplit(stopped_url).port
    assert f"127.0.0.1:{port}" in caplog.text  # the address is logged server-side
    assert urlsplit(stopped_url).password not in caplog.text

    raw.set(keys.usage("t_1"), "not a hash")  # WRONGTYPE from the server
    with ClusterState(valkey_url) as cs, pytest.raises(InternalError) as internal:
        cs.usage.get("t_1")
    _no_address(internal.value, valkey_url)
    assert keys.usage("t_1") not in str(internal.value)


def test_registry_errors_carry_no_address(
    stopped_url: str, valkey_url: str, raw: redis.Redis[str]
) -> None:
    with ClusterState(stopped_url, socket_timeout_s=0.5, socket_connect_timeout_s=0.5) as gone:
        with pytest.raises(UnavailableError) as info:
            gone.adapters.list("t_1")
        _no_address(info.value, stopped_url)

    raw.set(keys.adapter_names("t_1"), "not a set")
    with ClusterState(valkey_url) as cs, pytest.raises(InternalError) as internal:
        cs.adapters.list("t_1")
    _no_address(internal.value, valkey_url)


# --- servers left behind ---------------------------------------------------------------------


@pytest.fixture
def detached_valkey(
    tmp_path: Path,
) -> Iterator[tuple[EmbeddedValkey, subprocess.Popen[bytes], int]]:
    """A server run the way `vajra up` runs it: own session, argv from ``command``."""
    server = EmbeddedValkey(tmp_path / "valkey")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        server.command(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert server.wait_until_ready(port, lambda: proc.poll() is None, timeout_s=10)
    try:
        yield server, proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_recorded_server_is_stopped_only_if_it_is_ours(
    tmp_path: Path, detached_valkey: tuple[EmbeddedValkey, subprocess.Popen[bytes], int]
) -> None:
    server, proc, _ = detached_valkey
    pid_file = tmp_path / "valkey.pid"
    # A recycled pid: some other program now holds the recorded pid.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record_server(pid_file, other.pid, config_path=server.config_path, owner_pid=1)
        assert _mode(pid_file) == 0o600
        assert stop_recorded_server(pid_file) is False
        assert other.poll() is None and not pid_file.exists()
    finally:
        other.kill()
        other.wait(timeout=10)
    # Recorded for another supervisor: left alone.
    record_server(pid_file, proc.pid, config_path=server.config_path, owner_pid=12345)
    assert stop_recorded_server(pid_file, owner_pid=999) is False
    assert proc.poll() is None and pid_file.exists()
    # Ours: stopped (SIGTERM, so it writes its AOF), and the record removed.
    assert stop_recorded_server(pid_file) is True
    assert proc.wait(timeout=10) == 0
    assert not pid_file.exists()


def test_reaper_stops_valkey_once_the_supervisor_is_gone(
    tmp_path: Path, detached_valkey: tuple[EmbeddedValkey, subprocess.Popen[bytes], int]
) -> None:
    server, proc, _ = detached_valkey
    pid_file = tmp_path / "valkey.pid"
    lock = tmp_path / "lock"
    r, w = os.pipe()
    record_server(pid_file, proc.pid, config_path=server.config_path, owner_pid=os.getpid())
    reaper = subprocess.Popen(
        reaper_command(lifeline_fd=r, lock_path=lock, pid_file=pid_file, owner_pid=os.getpid()),
        pass_fds=(r,),
        start_new_session=True,
    )
    os.close(r)
    try:
        time.sleep(0.5)
        assert reaper.poll() is None and proc.poll() is None  # the supervisor still lives
        os.close(w)  # ... and now it is gone
        assert reaper.wait(timeout=20) == 0
        assert proc.wait(timeout=10) == 0
        assert not pid_file.exists()
    finally:
        if reaper.poll() is None:
            reaper.send_signal(signal.SIGKILL)
            reaper.wait(timeout=10)


def test_reaper_leaves_a_clean_shutdown_alone(tmp_path: Path) -> None:
    r, w = os.pipe()
    reaper = subprocess.Popen(
        reaper_command(
            lifeline_fd=r, lock_path=tmp_path / "lock", pid_file=tmp_path / "none", owner_pid=1
        ),
        pass_fds=(r,),
    )
    os.close(r)
    os.close(w)
    assert reaper.wait(timeout=20) == 0
    assert not (tmp_path / "lock").exists()
