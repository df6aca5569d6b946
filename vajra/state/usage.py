"""Usage in Redis: each usage event counted exactly once, aggregated per tenant, per day,
adapter, version and kind, and a bounded stream of the events.

This module is the one owner of the usage keys (:mod:`vajra.state.keys`); the ledger is their
only writer. One Lua script, per batch of events, sets each event's dedupe marker
(``vajra:usage:event:{id}``, kept ``dedupe_ttl_ms``), adds the fresh events to the tenant's
hash (``vajra:usage:{tenant_id}``) and appends them to the usage stream
(``vajra:usage:events``), so either all happen or none. Recording is therefore safe to resend.

The tenant's hash holds its running totals (``requests``, ``gpu_ms``, ``prompt_tokens``,
``completion_tokens``, ``billed_ms``, ``gradients``) and its buckets: one group of fields per
(UTC day, adapter, version, kind), named ``b|{day}|{adapter}|{version}|{kind}|{metric}``
(metric ``n`` events, ``gpu_us``, ``billed_ms``, ``prompt``, ``completion``, ``gradients``;
every one an integer, so sums are exact). :meth:`Usage.rows` answers a range of days from
them. Keeping the buckets in the tenant's one hash means deleting a tenant
(:mod:`vajra.state.tenant_purge`) removes all its aggregates, and its tombstone keeps late
usage from recreating any of them. Adapter names are ``[A-Za-z0-9_.-]`` and kinds fixed, so
``|`` never occurs inside a part.

The stream is the recent billing history, trimmed (approximately) to ``stream_maxlen``
entries; trimming never loses usage, because an event is aggregated by the same script that
appends it. The dedupe markers must outlive every possible resend: senders resend from
their journals until acknowledged, and an executor takes over its earlier incarnations'
journals when it starts, so ``dedupe_ttl_ms`` (days) must exceed the longest time an executor
id stays down with unacknowledged events. An event whose marker has expired is counted as
new; in practice such an event was never recorded (an event stays unacknowledged for long
only while the ledger or Redis cannot record it).

Errors: as :mod:`vajra.state.connection`; bad records raise InvalidRequest naming the field,
before anything is written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from vajra.errors import InternalError, InvalidRequest
from vajra.policies.billing import KINDS, UsageRow, day_of, gpu_us
from vajra.state import keys
from vajra.state.connection import Connection, KeyOwner, translate_errors
from vajra.state.fields import check_id, check_non_negative_int

__all__ = ["DEFAULT_USAGE_DEDUPE_TTL_S", "Usage", "UsageRecord", "UsageTotals"]

DEFAULT_USAGE_DEDUPE_TTL_S = 7 * 24 * 3600.0

_ADAPTER_RE = re.compile(r"[A-Za-z0-9_.-]{0,128}")
#: Bucket metrics, in the order the Lua script sums them.
_METRICS = ("n", "gpu_us", "billed_ms", "prompt", "completion", "gradients")
#: Integers up to this are exact in the script's (double) arithmetic, even summed over a batch.
_MAX_EXACT = 2**48


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """The measured usage of one request or training step; ``event_id`` makes recording it
    idempotent. ``billed_ms``: the GPU time billed (:func:`vajra.policies.billing.billed_gpu_ms`,
    0 for training); ``adapter`` the adapter's name ("" for the base model)."""

    event_id: str
    tenant_id: str
    request_id: str
    executor_id: str
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int
    ts_ms: int
    adapter: str = ""
    adapter_version: int = 0
    kind: str = "inference"
    gradients: int = 0
    billed_ms: int = 0


@dataclass(frozen=True, slots=True)
class UsageTotals:
    tenant_id: str
    requests: int
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int
    billed_ms: int = 0
    gradients: int = 0


# KEYS: usage stream, the hash of each tenant in the batch, then each tenant's
# deleted-tombstone (a deleted tenant's aggregates are never recreated by late usage), then one
# dedupe marker per event. ARGV: marker TTL ms, stream MAXLEN ("" = none), number of tenants,
# and the events as one msgpack array of [tenant index (1-based), event_id, tenant_id,
# request_id, executor_id, gpu_ms, prompt_tokens, completion_tokens, ts_ms, adapter,
# adapter_version, kind, gradients, billed_ms, gpu_us, day] (numbers as decimal strings, so
# the stream keeps exactly what was sent). Fresh events are summed per tenant and per bucket
# and added with one HINCRBY per field. Returns one character per event: "1" new, "0" already
# counted.
_RECORD_USAGE_LUA = """
local fields = {'event_id', 'tenant_id', 'request_id', 'executor_id', 'gpu_ms',
                'prompt_tokens', 'completion_tokens', 'ts_ms', 'adapter', 'adapter_version',
                'kind', 'gradients', 'billed_ms'}
local metrics = {'n', 'gpu_us', 'billed_ms', 'prompt', 'completion', 'gradients'}
local n_tenants = tonumber(ARGV[3])
local events = cmsgpack.unpack(ARGV[4])
local sums = {}
local out = {}
for i, ev in ipairs(events) do
  if redis.call('SET', KEYS[1 + 2 * n_tenants + i], '1', 'NX', 'PX', ARGV[1]) then
    local s = sums[ev[1]]
    if not s then
      s = {totals = {0, 0, 0, 0, 0, 0}, buckets = {}, order = {}}
      sums[ev[1]] = s
    end
    local t = s.totals
    t[1] = t[1] + 1
    t[2] = t[2] + tonumber(ev[6])
    t[3] = t[3] + tonumber(ev[7])
    t[4] = t[4] + tonumber(ev[8])
    t[5] = t[5] + tonumber(ev[14])
    t[6] = t[6] + tonumber(ev[13])
    local bucket = 'b|' .. ev[16] .. '|' .. ev[10] .. '|' .. ev[11] .. '|' .. ev[12] .. '|'
    local b = s.buckets[bucket]
    if not b then
      b = {0, 0, 0, 0, 0, 0}
      s.buckets[bucket] = b
      table.insert(s.order, bucket)
    end
    b[1] = b[1] + 1
    b[2] = b[2] + tonumber(ev[15])
    b[3] = b[3] + tonumber(ev[14])
    b[4] = b[4] + tonumber(ev[7])
    b[5] = b[5] + tonumber(ev[8])
    b[6] = b[6] + tonumber(ev[13])
    local entry = {}
    for j = 1, 13 do
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
for ti, s in pairs(sums) do
  local hash = KEYS[1 + ti]
  if redis.call('EXISTS', KEYS[1 + n_tenants + ti]) == 0 then
    local t = s.totals
    redis.call('HINCRBY', hash, 'requests', string.format('%d', t[1]))
    redis.call('HINCRBYFLOAT', hash, 'gpu_ms', string.format('%.17g', t[2]))
    redis.call('HINCRBY', hash, 'prompt_tokens', string.format('%d', t[3]))
    redis.call('HINCRBY', hash, 'completion_tokens', string.format('%d', t[4]))
    redis.call('HINCRBY', hash, 'billed_ms', string.format('%d', t[5]))
    redis.call('HINCRBY', hash, 'gradients', string.format('%d', t[6]))
    for _, bucket in ipairs(s.order) do
      local b = s.buckets[bucket]
      for m = 1, 6 do
        if b[m] ~= 0 then
          redis.call('HINCRBY', hash, bucket .. metrics[m], string.format('%d', b[m]))
        end
      end
    end
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
    if not isinstance(rec.adapter, str) or not _ADAPTER_RE.fullmatch(rec.adapter):
        raise InvalidRequest("adapter must be 0-128 characters of [A-Za-z0-9_.-]", field="adapter")
    check_non_negative_int(rec.adapter_version, "adapter_version")
    if rec.kind not in KINDS:
        raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}", field="kind")
    check_non_negative_int(rec.gradients, "gradients")
    check_non_negative_int(rec.billed_ms, "billed_ms")
    for name in ("prompt_tokens", "completion_tokens", "gradients", "billed_ms"):
        if getattr(rec, name) >= _MAX_EXACT:
            raise InvalidRequest(f"{name} is too large", field=name)


class Usage(KeyOwner):
    """Usage events, per-tenant totals and buckets. Thread-safe; no I/O until used.

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
                    rec.adapter,
                    str(rec.adapter_version),
                    rec.kind,
                    str(rec.gradients),
                    str(rec.billed_ms),
                    str(gpu_us(rec.gpu_ms)),
                    str(day_of(rec.ts_ms)),
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
        names = (
            "requests",
            "gpu_ms",
            "prompt_tokens",
            "completion_tokens",
            "billed_ms",
            "gradients",
        )
        values = self._r.hmget(keys.usage(tenant_id), names)
        row = {n: v for n, v in zip(names, values, strict=True) if v is not None}
        try:
            return UsageTotals(
                tenant_id=tenant_id,
                requests=int(row.get("requests", 0)),
                gpu_ms=float(row.get("gpu_ms", 0.0)),
                prompt_tokens=int(row.get("prompt_tokens", 0)),
                completion_tokens=int(row.get("completion_tokens", 0)),
                billed_ms=int(row.get("billed_ms", 0)),
                gradients=int(row.get("gradients", 0)),
            )
        except ValueError as exc:
            raise InternalError(f"malformed usage totals {keys.usage(tenant_id)}: {exc}") from exc

    @translate_errors
    def rows(
        self, tenant_id: str, *, start_ms: int | None = None, end_ms: int | None = None
    ) -> list[UsageRow]:
        """The tenant's usage buckets of the UTC days that overlap ``[start_ms, end_ms)`` (None:
        open), ordered by (day, adapter, version, kind). Reads the tenant's whole hash (one
        HSCAN pass; its size grows with days x adapters used)."""
        first = None if start_ms is None else day_of(max(0, start_ms))
        last = None if end_ms is None else day_of(max(0, end_ms - 1))
        if end_ms is not None and end_ms <= 0:
            return []
        buckets: dict[tuple[int, str, int, str], dict[str, int]] = {}
        for name, value in self._r.hscan_iter(keys.usage(tenant_id), match="b|*", count=1000):
            parts = name.split("|")
            try:
                if len(parts) != 6 or parts[5] not in _METRICS:
                    raise ValueError(name)
                day, version = int(parts[1]), int(parts[3])
                amount = int(value)
            except ValueError as exc:
                raise InternalError(f"malformed usage bucket {name!r}: {exc}") from exc
            if (first is not None and day < first) or (last is not None and day > last):
                continue
            buckets.setdefault((day, parts[2], version, parts[4]), {})[parts[5]] = amount
        return [
            UsageRow(
                day=day,
                adapter=adapter,
                adapter_version=version,
                kind=kind,
                events=m.get("n", 0),
                gpu_us=m.get("gpu_us", 0),
                billed_ms=m.get("billed_ms", 0),
                prompt_tokens=m.get("prompt", 0),
                completion_tokens=m.get("completion", 0),
                gradients=m.get("gradients", 0),
            )
            for (day, adapter, version, kind), m in sorted(buckets.items())
        ]

    def with_stream_maxlen(self, stream_maxlen: int | None) -> Usage:
        """This owner over the same connection, trimming the stream to ``stream_maxlen``."""
        if stream_maxlen is not None and stream_maxlen <= 0:
            raise InvalidRequest(
                "usage_stream_maxlen must be positive", field="usage_stream_maxlen"
            )
        return Usage(self._conn, dedupe_ttl_ms=self._dedupe_ttl_ms, stream_maxlen=stream_maxlen)
