"""What keeps one cluster per ``VAJRA_HOME``: the home lock and the free-port checks.

``$VAJRA_HOME/run/lock`` is held (``flock``) by the supervisor and inherited by every actor, so
it stays held until the last process of a cluster has exited. A second ``vajra up`` on the same
home fails at once while that supervisor lives, or waits (bounded) for a dead one's actors to
finish draining. Before anything starts, the ports the cluster will listen on are tried, and a
port in use fails the start with one line (:class:`StartupError`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import trio

log = logging.getLogger("vajra.supervisor")

#: How long a new ``vajra up`` waits for a dead supervisor's actors to release the home.
LEFTOVER_WAIT_S = 30.0


class StartupError(Exception):
    """``vajra up`` cannot start; the message is one line for the terminal."""


def _process_args(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _is_live_supervisor(pid: int) -> bool:
    args = _process_args(pid)
    if args is None:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return not Path("/proc").is_dir()  # no /proc to ask: assume it is one
    return "up" in args and any("vajra" in a for a in args)


class HomeLock:
    """``run/lock``: who runs a cluster in this home. See the module docstring.

    The descriptor is inherited by the actors (``fd``), so the lock outlives a killed
    supervisor until its last actor exits. The file holds the supervisor's pid.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    async def acquire(self, *, wait_s: float = LEFTOVER_WAIT_S) -> None:
        """Take the lock; StartupError at once if a live supervisor holds it, or after
        ``wait_s`` if processes of a dead one still do."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        taken = False
        try:
            deadline = trio.current_time() + wait_s
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pass
                holder = _read_pid(fd)
                home = self.path.parent.parent
                if holder is not None and holder != os.getpid() and _is_live_supervisor(holder):
                    raise StartupError(
                        f"a cluster is already running in {home} (supervisor pid {holder}); "
                        "stop it first, or set VAJRA_HOME to another directory"
                    )
                if trio.current_time() >= deadline:
                    raise StartupError(
                        f"processes of an earlier cluster in {home} still hold {self.path} "
                        f"after {wait_s:.0f}s; stop them first"
                    )
                if not waited:
                    log.info("waiting for the processes of an earlier cluster in %s to exit", home)
                    waited = True
                await trio.sleep(0.1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            taken = True
        finally:
            if not taken:
                os.close(fd)
        self.fd = fd

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # the lock itself lives on while an actor still holds a copy


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def tcp_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://host:port`` address; None for other transports."""
    if not address.startswith("tcp://"):
        return None
    parts = urlsplit(address)
    if parts.port is None:
        return None
    host = parts.hostname or "127.0.0.1"
    return ("0.0.0.0" if host == "*" else host), parts.port


def check_port_free(host: str, port: int, what: str) -> None:
    """StartupError (one line) if something listens on ``host:port`` already."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As the servers themselves bind: a port whose old connections linger in TIME_WAIT
        # is free, one with a listener is not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"the {what} port {host}:{port} is in use ({exc.strerror}): another cluster "
                "or program is listening there; stop it or choose another port"
            ) from None
