"""The one way Vajra reaches Redis/Valkey: a pooled client built from a URL, and how it fails.

Every key owner in :mod:`vajra.state` (tenants, API keys, heartbeats, usage, request events,
adapter records) derives from :class:`KeyOwner` and is built over one :class:`Connection`,
so they share one connection pool, one retry policy and one way of reporting failures.

Errors: a store that cannot be reached (connection refused, reset, timed out, still loading
its data, a wrong password) raises :class:`~vajra.errors.UnavailableError`, which is
retriable; any other Redis error raises :class:`~vajra.errors.InternalError`. Their messages
travel to clients, so they name no address, URL or key: the details (the store's address
with its password masked, redis-py's own message) are logged here instead, at most once a
second per connection so an outage does not flood the log. Methods wrapped in
:func:`translate_errors` raise only these.

Retries: a command that fails with a connection error is retried ``retries`` times (short
exponential backoff); a write whose reply was lost to a timeout is not retried, so the caller
cannot tell whether it happened.

Secrets: URLs may carry a password; show them through :func:`redact_url` /
:func:`redact_secrets`.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry

from vajra.errors import InternalError, UnavailableError, VajraError

__all__ = [
    "Connection",
    "KeyOwner",
    "redact_secrets",
    "redact_url",
    "translate_errors",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def redact_url(url: str) -> str:
    """The URL with its password masked (``redis://:***@host:port``), for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


_URL_PASSWORD_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@"
)


def redact_secrets(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` URL in it masked."""
    return _URL_PASSWORD_RE.sub(r"\g<scheme>\g<user>:***@", text)


class Connection:
    """One pooled redis-py client for the store at ``url``; thread-safe.

    Constructing one does no I/O: the first command connects. :meth:`close` closes the
    pooled connections; later commands reconnect.
    """

    def __init__(
        self,
        url: str,
        *,
        socket_timeout_s: float = 2.0,
        socket_connect_timeout_s: float = 2.0,
        retries: int = 1,
    ) -> None:
        self._address = redact_url(url)
        self._last_logged = -math.inf
        self.client: redis.Redis[str] = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_connect_timeout_s,
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries, (redis.ConnectionError,)),
        )

    @property
    def address(self) -> str:
        """The store's URL with any password masked."""
        return self._address

    def script(self, source: str) -> Script:
        """Register a Lua script; calling it runs EVALSHA (loading the script when needed)."""
        return self.client.register_script(source)

    def transaction(self, func: Callable[[Any], R], *watches: str) -> R:
        """Run ``func(pipe)`` under WATCH ``watches``, retrying while a watched key changes.

        ``func`` reads in immediate mode, calls ``pipe.multi()``, queues its writes, and
        returns its result; the queued writes run as one MULTI/EXEC.
        """
        # types-redis leaves transaction() unannotated.
        result = self.client.transaction(func, *watches, value_from_callable=True)  # type: ignore[no-untyped-call]
        return cast(R, result)

    def translate(self, exc: redis.RedisError, what: str) -> VajraError:
        """The Vajra error for ``exc``; ``what`` names the store in the message."""
        now = time.monotonic()
        if now - self._last_logged >= 1.0:
            self._last_logged = now
            detail = redact_secrets(f"{type(exc).__name__}: {exc}")
            log.warning("%s at %s: %s", what, self._address, detail)
        if isinstance(exc, redis.TimeoutError):
            return UnavailableError(f"{what} did not answer in time; retry")
        if isinstance(exc, redis.AuthenticationError):
            return UnavailableError(f"{what} refused our credentials")
        if isinstance(exc, redis.BusyLoadingError):
            return UnavailableError(f"{what} is loading its data; retry")
        if isinstance(exc, redis.ConnectionError):
            return UnavailableError(f"{what} is unreachable; retry")
        return InternalError(f"{what} failed ({type(exc).__name__})")

    def close(self) -> None:
        """Close the pooled connections. Further calls reconnect."""
        self.client.close()

    def __repr__(self) -> str:
        return f"<Connection {self._address}>"


class KeyOwner:
    """Base of the classes that own one group of keys: their connection, and their errors.

    ``what`` names the store in the messages of the errors its methods raise.
    """

    what = "the cluster state store"

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._r = conn.client


OwnerT = TypeVar("OwnerT", bound=KeyOwner)


def translate_errors(
    method: Callable[Concatenate[OwnerT, P], R],
) -> Callable[Concatenate[OwnerT, P], R]:
    """Wrap a :class:`KeyOwner` method so redis-py's exceptions leave it as Vajra errors."""

    @functools.wraps(method)
    def wrapper(self: OwnerT, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise self._conn.translate(exc, self.what) from exc

    return wrapper
