"""Usage in Redis: each request's measured usage, counted exactly once, and per-tenant totals.

The ledger is the only writer: one Lua script sets an event's dedupe marker
(``vajra:usage:event:{id}``, kept for ``dedupe_ttl_ms``), adds to the tenant's running totals
(``vajra:usage:{tenant_id}``) and appends to the usage stream (``vajra:usage:events``, the
billing history), so either all happen or none. Recording is therefore safe to resend; an
event replayed after its marker expired would be counted again. Totals of a deleted tenant
(its tombstone, :mod:`vajra.state.tenant_purge`) are never recreated by late usage. Errors: as
:mod:`vajra.state.connection`; bad records raise InvalidRequest naming the field, before
anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from vajra.errors import InternalError, InvalidRequest
from vajra.state import keys
from vajra.state.connection import Connection, KeyOwner, translate_errors
from vajra.state.fields import check_id, check_non_negative_int

__all__ = ["DEFAULT_USAGE_DEDUPE_TTL_S", "Usage", "UsageRecord", "UsageTotals"]

DEFAULT_USAGE_DEDUPE_TTL_S = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """The measured usage of one request; ``event_id`` makes recording it idempotent."""

    event_id: str
    tenant_id: str
    request_id: str
    executor_id: str
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int
    ts_ms: int


@dataclass(frozen=True, slots=True)
class UsageTotals:
    tenant_id: str
    requests: int
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int


# KEYS: usage stream, the usage totals of each tenant in the batch, then one dedupe marker per
# event; KEYS also hold, after the totals, each tenant's deleted-tombstone (totals of a deleted
# tenant are never recreated by late usage). ARGV: marker TTL ms, stream MAXLEN ("" = none),
# number of tenants, and the events as
# one msgpack array of [tenant index (1-based), event_id, tenant_id, request_id, executor_id,
# gpu_ms, prompt_tokens, completion_tokens, ts_ms] (numbers as decimal strings, so the stream
# keeps exactly what was sent). Fresh events are summed per tenant and added with one set of
# HINCRBYs per tenant. Returns one character per event: "1" new, "0" already counted.
_RECORD_USAGE_LUA = """
local fields = {'event_id', 'tenant_id', 'request_id', 'executor_id',
                'gpu_ms', 'prompt_tokens', 'completion_tokens', 'ts_ms'}
local n_tenants = tonumber(ARGV[3])
local events = cmsgpack.unpack(ARGV[4])
local sums = {}
local out = {}
for i, ev in ipairs(events) do
  if redis.call('SET', KEYS[1 + 2 * n_tenants + i], '1', 'NX', 'PX', ARGV[1]) then
    local s = sums[ev[1]]
    if not s then
      s = {0, 0, 0, 0}
      sums[ev[1]] = s
    end
    s[1] = s[1] + 1
    s[2] = s[2] + tonumber(ev[6])
    s[3] = s[3] + tonumber(ev[7])
    s[4] = s[4] + tonumber(ev[8])
    local entry = {}
    for j = 1, 8 do
      entry[2 * j - 1] = fields[j]
      entry[2 * j] = ev[j + 1]
    end
    if ARGV[2] == '' then
      redis.call('XADD', KEYS[1], '*', unpack(entry))
    else
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(entry))
    end
    out[i] = '1'
  else
    out[i] = '0'
  end
end
for t, s in pairs(sums) do
  local totals = KEYS[1 + t]
  if redis.call('EXISTS', KEYS[1 + n_tenants + t]) == 0 then
    redis.call('HINCRBY', totals, 'requests', string.format('%d', s[1]))
    redis.call('HINCRBYFLOAT', totals, 'gpu_ms', string.format('%.17g', s[2]))
    redis.call('HINCRBY', totals, 'prompt_tokens', string.format('%d', s[3]))
    redis.call('HINCRBY', totals, 'completion_tokens', string.format('%d', s[4]))
  end
end
return table.concat(out)
"""


def _check_usage(rec: UsageRecord) -> None:
    check_id(rec.event_id, "event_id")
    check_id(rec.tenant_id, "tenant_id")
    if rec.tenant_id == "events":  # would collide with the usage stream's key
        raise InvalidRequest("tenant_id 'events' is reserved", field="tenant_id")
    for name in ("request_id", "executor_id"):
        if not isinstance(getattr(rec, name), str):
            raise InvalidRequest(f"{name} must be a string", field=name)
    gpu_ms = rec.gpu_ms
    if (
        isinstance(gpu_ms, bool)
        or not isinstance(gpu_ms, int | float)
        or not math.isfinite(gpu_ms)
        or gpu_ms < 0
    ):
        raise InvalidRequest("gpu_ms must be a finite non-negative number", field="gpu_ms")
    check_non_negative_int(rec.prompt_tokens, "prompt_tokens")
    check_non_negative_int(rec.completion_tokens, "completion_tokens")
    check_non_negative_int(rec.ts_ms, "ts_ms")


class Usage(KeyOwner):
    """Usage events and per-tenant totals. Thread-safe; no I/O until used.

    ``dedupe_ttl_ms``: how long an event id is remembered; ``stream_maxlen``: the usage
    stream is trimmed (approximately) to this many entries (None: never trimmed).
    """

    def __init__(
        self, conn: Connection, *, dedupe_ttl_ms: int, stream_maxlen: int | None = None
    ) -> None:
        super().__init__(conn)
        self._dedupe_ttl_ms = dedupe_ttl_ms
        self._stream_maxlen = "" if stream_maxlen is None else str(stream_maxlen)
        self._record_lua = conn.script(_RECORD_USAGE_LUA)

    @translate_errors
    def record(self, rec: UsageRecord) -> bool:
        """Count one request's usage exactly once; returns False for a repeated event id."""
        return self.record_many([rec])[0]

    @translate_errors
    def record_many(self, records: Sequence[UsageRecord]) -> list[bool]:
        """:meth:`record` for a batch: one Lua call records the whole batch atomically.

        Every record is validated before anything is written.
        """
        for rec in records:
            _check_usage(rec)
        if not records:
            return []
        tenant_index: dict[str, int] = {}
        events: list[list[str | int]] = []
        for rec in records:
            index = tenant_index.setdefault(rec.tenant_id, len(tenant_index) + 1)
            events.append(
                [
                    index,
                    rec.event_id,
                    rec.tenant_id,
                    rec.request_id,
                    rec.executor_id,
                    repr(float(rec.gpu_ms)),
                    str(rec.prompt_tokens),
                    str(rec.completion_tokens),
                    str(rec.ts_ms),
                ]
            )
        keys_ = [
            keys.usage_events(),
            *(keys.usage(t) for t in tenant_index),
            *(keys.tenant_deleted(t) for t in tenant_index),
            *(keys.usage_event(rec.event_id) for rec in records),
        ]
        args = [
            str(self._dedupe_ttl_ms),
            self._stream_maxlen,
            str(len(tenant_index)),
            msgspec.msgpack.encode(events),
        ]
        flags = self._record_lua(keys=keys_, args=args)
        return [c == "1" for c in flags]

    @translate_errors
    def get(self, tenant_id: str) -> UsageTotals:
        """A tenant's running totals (all zero if it never used anything)."""
        row = self._r.hgetall(keys.usage(tenant_id))
        try:
            return UsageTotals(
                tenant_id=tenant_id,
                requests=int(row.get("requests", 0)),
                gpu_ms=float(row.get("gpu_ms", 0.0)),
                prompt_tokens=int(row.get("prompt_tokens", 0)),
                completion_tokens=int(row.get("completion_tokens", 0)),
            )
        except ValueError as exc:
            raise InternalError(f"malformed usage totals {keys.usage(tenant_id)}: {exc}") from exc
