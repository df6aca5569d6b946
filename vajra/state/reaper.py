"""Embedded Valkey servers left behind: the pid record, stopping a recorded server, the reaper.

``vajra up`` runs its embedded Valkey (:mod:`vajra.state.embedded`) in its own session,
records it in a pid file (:func:`record_server`), and starts a reaper next to it, so that a
server left behind by a killed supervisor is stopped — by the reaper
(:func:`reap_after_parent`) once the killed supervisor's actors have exited, or at the latest
by the next ``vajra up`` on the same home (:func:`stop_recorded_server`). A recorded server
is only ever signalled after ``/proc/PID/cmdline`` shows it is this binary running this data
directory's configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from vajra.state.embedded import STOP_TIMEOUT_S, write_private_file

__all__ = [
    "REAPER_WAIT_S",
    "is_recorded_server",
    "reap_after_parent",
    "reaper_command",
    "record_server",
    "stop_recorded_server",
]

log = logging.getLogger(__name__)

#: How long the reaper waits for the killed supervisor's actors to exit before it stops Valkey.
REAPER_WAIT_S = 60.0


def record_server(pid_file: Path, pid: int, *, config_path: Path, owner_pid: int) -> None:
    """Note that ``pid`` runs the server configured by ``config_path`` for supervisor ``owner_pid``."""
    record = {"pid": pid, "config": str(config_path), "owner_pid": owner_pid}
    write_private_file(pid_file, json.dumps(record) + "\n")


def _read_record(pid_file: Path) -> dict[str, object] | None:
    try:
        record = json.loads(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def is_recorded_server(pid: int, config_path: str | Path) -> bool:
    """Whether ``pid`` is a ``valkey-server`` started with exactly ``config_path``."""
    argv = _cmdline(pid)
    return (
        argv is not None
        and len(argv) >= 2
        and Path(argv[0]).name == "valkey-server"
        and argv[1] == str(config_path)
    )


def stop_recorded_server(
    pid_file: Path, *, owner_pid: int | None = None, timeout_s: float = STOP_TIMEOUT_S
) -> bool:
    """Stop the server ``pid_file`` records, if it still runs; returns whether one was stopped.

    With ``owner_pid``, only a server recorded for that supervisor is touched. The process is
    signalled only if its command line is the recorded binary and configuration (a recycled
    pid is left alone). SIGTERM lets Valkey flush its append-only file; SIGKILL follows after
    ``timeout_s``. The pid file is removed once the server is gone.
    """
    record = _read_record(pid_file)
    if record is None:
        return False
    if owner_pid is not None and record.get("owner_pid") != owner_pid:
        return False
    pid, config = record.get("pid"), record.get("config")
    stopped = False
    if isinstance(pid, int) and isinstance(config, str) and is_recorded_server(pid, config):
        log.warning("stopping embedded Valkey %d left by an earlier supervisor", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stopped = True
    if _read_record(pid_file) == record:
        pid_file.unlink(missing_ok=True)
    return stopped


def reaper_command(
    *, lifeline_fd: int, lock_path: Path, pid_file: Path, owner_pid: int
) -> list[str]:
    """The argv of the reaper process (see :func:`reap_after_parent`)."""
    code = "import sys; from vajra.state.reaper import reap_after_parent as r; sys.exit(r())"
    return [
        sys.executable,
        "-c",
        code,
        "--lifeline-fd",
        str(lifeline_fd),
        "--lock",
        str(lock_path),
        "--pid-file",
        str(pid_file),
        "--owner",
        str(owner_pid),
    ]


def reap_after_parent(argv: Sequence[str] | None = None) -> int:
    """The reaper: stop the embedded Valkey once its supervisor and the actors are gone.

    Valkey cannot watch its supervisor, so ``vajra up`` starts this small process (in its own
    session) next to it. It blocks on the read end of the supervisor's lifeline pipe; the
    pipe reaches end-of-file when the supervisor exits, however it exits. A supervisor that
    stopped cleanly has already stopped Valkey and removed the pid file, and the reaper just
    exits. Otherwise it waits (up to ``REAPER_WAIT_S``) for the home lock, which the actors
    hold until the last of them has drained and exited — so the ledger's last flush still
    reaches Valkey — and then stops the server recorded for its supervisor. It gives up as
    soon as the record names another supervisor or is gone: a newer ``vajra up`` took the
    home over and stops the old server itself.
    """
    parser = argparse.ArgumentParser(prog="vajra-valkey-reaper")
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--pid-file", type=Path, required=True)
    parser.add_argument("--owner", type=int, required=True)
    parser.add_argument("--wait-s", type=float, default=REAPER_WAIT_S)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s valkey-reaper %(levelname)s %(message)s"
    )
    with contextlib.suppress(OSError):
        while os.read(args.lifeline_fd, 512):
            pass
    os.close(args.lifeline_fd)

    def ours() -> bool:  # still the server of our supervisor (no newer `vajra up` took over)
        record = _read_record(args.pid_file)
        return record is not None and record.get("owner_pid") == args.owner

    if not ours():
        return 0
    with open(args.lock, "a+b") as lock:
        deadline = time.monotonic() + args.wait_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not ours():
                    return 0
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        stop_recorded_server(args.pid_file, owner_pid=args.owner)
    return 0
