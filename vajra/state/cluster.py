"""The cluster state in one Redis/Valkey database: every key owner over one connection.

:class:`ClusterState` builds the owners over one :class:`~vajra.state.connection.Connection`
and holds them as attributes, one per group of keys (:mod:`vajra.state.keys`)::

    state = ClusterState(url)
    record, api_key = state.tenants.create("acme")
    state.api_keys.authenticate(api_key)

Every method is synchronous and thread-safe; Trio code calls them through an
:class:`~vajra.state.offloop.OffLoop` (``await redis.run(state.usage.get, tenant_id)``).

Atomicity: every method that touches more than one key does so in one Lua script or one
WATCH/MULTI/EXEC transaction, so no reader ever sees half of an update. Usage recording is
safe to resend (deduplicated by event id); the other writes are idempotent except
``tenants.create`` and ``api_keys.create``, which a caller should not blindly repeat.
"""

from __future__ import annotations

from types import TracebackType

from vajra.errors import InvalidRequest
from vajra.state.adapters import AdapterRecords
from vajra.state.api_keys import ApiKeys
from vajra.state.connection import Connection, KeyOwner, translate_errors
from vajra.state.heartbeats import Heartbeats
from vajra.state.jobs import Jobs
from vajra.state.request_events import RequestEvents
from vajra.state.tenants import Tenants
from vajra.state.usage import DEFAULT_USAGE_DEDUPE_TTL_S, Usage

__all__ = ["ClusterState"]


class ClusterState(KeyOwner):
    """The owners of the cluster's keys, sharing one connection pool.

    Constructing one does no I/O; the first call connects. :meth:`ping` checks the store is
    reachable. ``usage_dedupe_ttl_s`` is how long a usage event id is remembered (and a
    deleted tenant's tombstone kept); ``usage_stream_maxlen`` trims the usage stream.
    """

    def __init__(
        self,
        url: str,
        *,
        socket_timeout_s: float = 2.0,
        socket_connect_timeout_s: float = 2.0,
        retries: int = 1,
        usage_dedupe_ttl_s: float = DEFAULT_USAGE_DEDUPE_TTL_S,
        usage_stream_maxlen: int | None = None,
    ) -> None:
        if usage_dedupe_ttl_s <= 0:
            raise InvalidRequest("usage_dedupe_ttl_s must be positive", field="usage_dedupe_ttl_s")
        if usage_stream_maxlen is not None and usage_stream_maxlen <= 0:
            raise InvalidRequest(
                "usage_stream_maxlen must be positive", field="usage_stream_maxlen"
            )
        conn = Connection(
            url,
            socket_timeout_s=socket_timeout_s,
            socket_connect_timeout_s=socket_connect_timeout_s,
            retries=retries,
        )
        super().__init__(conn)
        dedupe_ttl_ms = max(1, round(usage_dedupe_ttl_s * 1000))
        self.tenants = Tenants(conn, tombstone_ttl_ms=dedupe_ttl_ms)
        self.api_keys = ApiKeys(conn, self.tenants)
        self.heartbeats = Heartbeats(conn)
        self.usage = Usage(conn, dedupe_ttl_ms=dedupe_ttl_ms, stream_maxlen=usage_stream_maxlen)
        self.events = RequestEvents(conn)
        self.adapters = AdapterRecords(conn)
        self.jobs = Jobs(conn)

    @property
    def address(self) -> str:
        """The store's URL with any password masked."""
        return self._conn.address

    @translate_errors
    def ping(self) -> None:
        """Return if the store answers PING; raise UnavailableError if it does not."""
        self._r.ping()

    def close(self) -> None:
        """Close the pooled connections. Further calls reconnect."""
        self._conn.close()

    def __enter__(self) -> ClusterState:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ClusterState {self._conn.address}>"
