"""The predictor's data in Redis: how often, and how lately, each adapter was requested.

One hash per adapter (``vajra:predictor:adapter:{id}``: ``requests``, ``last_ms``), updated
by one Lua script so the count and the latest time move together. Ids are
``{tenant_id}/{digest}``: a deleted tenant's hashes are removed with it
(:mod:`vajra.state.tenant_purge`) and counts that arrive later do not recreate them. Errors: as
:mod:`vajra.state.connection`; bad arguments raise InvalidRequest naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from vajra.errors import InternalError, InvalidRequest
from vajra.state import keys
from vajra.state.connection import Connection, KeyOwner, translate_errors
from vajra.state.fields import check_non_negative_int

__all__ = ["AdapterStats", "RequestEvents"]


@dataclass(frozen=True, slots=True)
class AdapterStats:
    """The predictor's record for one adapter; ``last_ms`` is None if never requested."""

    adapter: str
    requests: int
    last_ms: int | None


# KEYS: predictor adapter hash, the tenant's deletion tombstone ("": none); ARGV: ts_ms, count
# A deleted tenant's counts are not recreated (returns 0).
_REQUEST_EVENT_LUA = """
if KEYS[2] ~= '' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HINCRBY', KEYS[1], 'requests', tonumber(ARGV[2]))
local last = redis.call('HGET', KEYS[1], 'last_ms')
if (not last) or tonumber(last) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'last_ms', ARGV[1])
end
return 1
"""


class RequestEvents(KeyOwner):
    """Per-adapter request counts and latest request times. Thread-safe; no I/O until used."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._record_lua = conn.script(_REQUEST_EVENT_LUA)

    @translate_errors
    def record(self, adapter: str, ts_ms: int, count: int = 1) -> None:
        """Count ``count`` requests for ``adapter``; ``last_ms`` keeps the latest ``ts_ms`` seen."""
        if not isinstance(adapter, str) or not adapter:
            raise InvalidRequest("adapter must be a non-empty string", field="adapter")
        check_non_negative_int(ts_ms, "ts_ms")
        check_non_negative_int(count, "count")
        tenant, _, rest = adapter.partition("/")
        tombstone = keys.tenant_deleted(tenant) if rest else ""
        self._record_lua(
            keys=[keys.predictor_adapter(adapter), tombstone], args=[str(ts_ms), str(count)]
        )

    @translate_errors
    def stats(self, adapter: str) -> AdapterStats:
        row = self._r.hgetall(keys.predictor_adapter(adapter))
        try:
            last = row.get("last_ms")
            return AdapterStats(
                adapter=adapter,
                requests=int(row.get("requests", 0)),
                last_ms=None if last is None else int(last),
            )
        except ValueError as exc:
            raise InternalError(
                f"malformed predictor record {keys.predictor_adapter(adapter)}: {exc}"
            ) from exc
