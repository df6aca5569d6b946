"""Cluster state in Redis/Valkey: tenants, API keys, heartbeats, usage, predictor events.

:class:`ClusterState` is the synchronous client; :class:`AsyncClusterState` offers the
same methods to Trio code, each call run in a worker thread so the event loop never
blocks on Redis. Every key is spelled in :mod:`vajra.state.keys`.

Errors: a store that cannot be reached (connection refused, reset, timed out, still
loading its data, a wrong password) raises :class:`~vajra.errors.UnavailableError`, which is
retriable; any other Redis error raises :class:`~vajra.errors.InternalError`. Their messages
travel to clients, so they name no address, URL or key: the details (the store's address
with its password masked, redis-py's own message) are logged here instead
(:class:`StoreErrors`). Bad arguments raise :class:`~vajra.errors.InvalidRequest` naming the
field, before anything is written.

Atomicity: every method that touches more than one key does so in one Lua script or
one WATCH/MULTI/EXEC transaction, so no reader ever sees half of an update.
A command that fails with a connection error is retried once (``retries``); a write
whose reply was lost to a timeout is not retried, so the caller cannot tell whether it
happened. :meth:`ClusterState.record_usage` is safe to resend (it is deduplicated by
event id); the other writes are idempotent except :meth:`ClusterState.create_tenant`
and :meth:`ClusterState.create_api_key`, which a caller should not blindly repeat.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis
import trio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from vajra.errors import (
    InternalError,
    InvalidRequest,
    NotFoundError,
    UnavailableError,
    VajraError,
)
from vajra.state import keys

__all__ = [
    "AdapterStats",
    "AsyncClusterState",
    "ClusterState",
    "ExecutorHeartbeat",
    "StoreErrors",
    "TenantPurge",
    "TenantRecord",
    "UsageRecord",
    "UsageTotals",
    "redact_secrets",
    "redact_url",
]

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

TENANT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Tenant names: 1-64 characters of letters, digits, ``_``, ``.`` and ``-`` (case-sensitive)."""

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
API_KEY_PREFIX = "vk_"
_MAX_API_KEY_LEN = 256
DEFAULT_USAGE_DEDUPE_TTL_S = 7 * 24 * 3600.0


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantRecord:
    tenant_id: str
    name: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class TenantPurge:
    """What :meth:`ClusterState.delete_tenant` removed, and what is left for the caller.

    ``object_keys`` are the object-store prefixes of the tenant's adapter files (see
    :func:`vajra.storage.adapter_object_key`): the state no longer refers to them, and the
    caller deletes them (``vajra.storage.delete_adapter_objects``) once no request still
    reads them.
    """

    tenant_id: str
    name: str | None  # None: no tenant record was left, only keys of it were purged
    api_keys: int  # API keys revoked
    object_keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ExecutorHeartbeat:
    """What an executor publishes about itself every heartbeat period."""

    executor_id: str
    incarnation: str
    model: str
    device: str
    free_memory_bytes: int
    queue_depth: int
    running: int
    resident_adapters: tuple[str, ...]
    max_batch_size: int
    updated_ms: int


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


@dataclass(frozen=True, slots=True)
class AdapterStats:
    """The predictor's record for one adapter; ``last_ms`` is None if never requested."""

    adapter: str
    requests: int
    last_ms: int | None


# --- Lua scripts ---------------------------------------------------------------------------

# KEYS: tenant-name, tenant, tenants, apikey, tenant-keys
# ARGV: tenant_id, name, created_ms, key_sha256, key_id
_CREATE_TENANT_LUA = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  return 0
end
redis.call('HSET', KEYS[2], 'name', ARGV[2], 'created_ms', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[4], 'tenant_id', ARGV[1], 'created_ms', ARGV[3], 'key_id', ARGV[5])
redis.call('SADD', KEYS[5], ARGV[4])
return 1
"""

# KEYS: tenant, apikey, tenant-keys
# ARGV: tenant_id, created_ms, key_sha256, key_id
_CREATE_API_KEY_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], 'tenant_id', ARGV[1], 'created_ms', ARGV[2], 'key_id', ARGV[4])
redis.call('SADD', KEYS[3], ARGV[3])
return 1
"""

# KEYS: executors set, then one executor hash per id in ARGV (same order)
_PRUNE_EXECUTORS_LUA = """
local removed = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    removed = removed + redis.call('SREM', KEYS[1], ARGV[i])
  end
end
return removed
"""

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

# KEYS: predictor adapter hash; ARGV: ts_ms
_REQUEST_EVENT_LUA = """
redis.call('HINCRBY', KEYS[1], 'requests', tonumber(ARGV[2]))
local last = redis.call('HGET', KEYS[1], 'last_ms')
if (not last) or tonumber(last) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'last_ms', ARGV[1])
end
return 1
"""


# --- helpers -------------------------------------------------------------------------------


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _digest(api_key: str) -> str:
    """SHA-256 hex of an API key. Keys carry 256 random bits, so no slow KDF is needed."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def _new_api_key() -> tuple[str, str, str]:
    """A fresh key, its digest, and a public key id (for listing and audit logs)."""
    api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return api_key, _digest(api_key), "key_" + secrets.token_hex(6)


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


class StoreErrors:
    """Turns redis-py's exceptions into Vajra errors whose messages name no address.

    ``what`` names the store in the message (``"the cluster state store"``); ``address``
    (already redacted) goes only to this process's log, at most once per second so an
    outage does not flood it.
    """

    def __init__(self, what: str, address: str) -> None:
        self.what = what
        self.address = address
        self._last_logged = -math.inf

    def translate(self, exc: redis.RedisError) -> VajraError:
        now = time.monotonic()
        if now - self._last_logged >= 1.0:
            self._last_logged = now
            detail = redact_secrets(f"{type(exc).__name__}: {exc}")
            log.warning("%s at %s: %s", self.what, self.address, detail)
        if isinstance(exc, redis.TimeoutError):
            return UnavailableError(f"{self.what} did not answer in time; retry")
        if isinstance(exc, redis.AuthenticationError):
            return UnavailableError(f"{self.what} refused our credentials")
        if isinstance(exc, redis.BusyLoadingError):
            return UnavailableError(f"{self.what} is loading its data; retry")
        if isinstance(exc, redis.ConnectionError):
            return UnavailableError(f"{self.what} is unreachable; retry")
        return InternalError(f"{self.what} failed ({type(exc).__name__})")


def _check_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidRequest(f"{field} must be 1-128 characters of [A-Za-z0-9_.-]", field=field)
    return value


def _check_non_negative_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{field} must be a non-negative integer", field=field)
    return value


def _tenant_from_hash(tenant_id: str, row: Mapping[str, str]) -> TenantRecord:
    try:
        return TenantRecord(tenant_id, row["name"], int(row["created_ms"]))
    except (KeyError, ValueError) as exc:
        raise InternalError(f"malformed tenant record {keys.tenant(tenant_id)}: {exc}") from exc


def _heartbeat_to_hash(hb: ExecutorHeartbeat) -> dict[str, str]:
    return {
        "incarnation": hb.incarnation,
        "model": hb.model,
        "device": hb.device,
        "free_memory_bytes": str(hb.free_memory_bytes),
        "queue_depth": str(hb.queue_depth),
        "running": str(hb.running),
        "resident_adapters": json.dumps(list(hb.resident_adapters)),
        "max_batch_size": str(hb.max_batch_size),
        "updated_ms": str(hb.updated_ms),
    }


def _heartbeat_from_hash(executor_id: str, row: Mapping[str, str]) -> ExecutorHeartbeat:
    """Raises KeyError, ValueError or TypeError on a malformed hash."""
    adapters = json.loads(row["resident_adapters"])
    if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
        raise ValueError("resident_adapters is not a JSON list of strings")
    return ExecutorHeartbeat(
        executor_id=executor_id,
        incarnation=row["incarnation"],
        model=row["model"],
        device=row["device"],
        free_memory_bytes=int(row["free_memory_bytes"]),
        queue_depth=int(row["queue_depth"]),
        running=int(row["running"]),
        resident_adapters=tuple(adapters),
        max_batch_size=int(row["max_batch_size"]),
        updated_ms=int(row["updated_ms"]),
    )


def _check_usage(rec: UsageRecord) -> None:
    _check_id(rec.event_id, "event_id")
    _check_id(rec.tenant_id, "tenant_id")
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
    _check_non_negative_int(rec.prompt_tokens, "prompt_tokens")
    _check_non_negative_int(rec.completion_tokens, "completion_tokens")
    _check_non_negative_int(rec.ts_ms, "ts_ms")


def _translate_errors(
    method: Callable[Concatenate[ClusterState, P], R],
) -> Callable[Concatenate[ClusterState, P], R]:
    """Turn redis-py's exceptions into Vajra's typed errors."""

    @functools.wraps(method)
    def wrapper(self: ClusterState, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise self._errors.translate(exc) from exc

    return wrapper


# --- the synchronous client ----------------------------------------------------------------


class ClusterState:
    """Synchronous access to the cluster state in one Redis/Valkey database.

    Thread-safe: calls share a connection pool. Constructing one does no I/O; the first
    call connects. Use :meth:`ping` to check the store is reachable.
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
        self._address = redact_url(url)
        self._errors = StoreErrors("the cluster state store", self._address)
        self._dedupe_ttl_ms = max(1, round(usage_dedupe_ttl_s * 1000))
        self._stream_maxlen = "" if usage_stream_maxlen is None else str(usage_stream_maxlen)
        self._r: redis.Redis[str] = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_connect_timeout_s,
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries, (redis.ConnectionError,)),
        )
        self._create_tenant_lua = self._r.register_script(_CREATE_TENANT_LUA)
        self._create_api_key_lua = self._r.register_script(_CREATE_API_KEY_LUA)
        self._prune_executors_lua = self._r.register_script(_PRUNE_EXECUTORS_LUA)
        self._record_usage_lua = self._r.register_script(_RECORD_USAGE_LUA)
        self._request_event_lua = self._r.register_script(_REQUEST_EVENT_LUA)

    @property
    def address(self) -> str:
        """The store's URL with any password masked."""
        return self._address

    def close(self) -> None:
        """Close the pooled connections. Further calls reconnect."""
        self._r.close()

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
        return f"<ClusterState {self._address}>"

    def _run_script(self, script: Any, keys_: list[str], args: list[str]) -> int:
        return int(script(keys=keys_, args=args))

    def _transaction(self, func: Callable[[Any], R], *watches: str) -> R:
        """Run ``func(pipe)`` under WATCH ``watches``, retrying while a watched key changes.

        ``func`` reads in immediate mode, calls ``pipe.multi()``, queues its writes, and
        returns its result; the queued writes run as one MULTI/EXEC.
        """
        # types-redis leaves transaction() unannotated.
        result = self._r.transaction(func, *watches, value_from_callable=True)  # type: ignore[no-untyped-call]
        return cast(R, result)

    # --- liveness ------------------------------------------------------------------------

    @_translate_errors
    def ping(self) -> None:
        """Return if the store answers PING; raise UnavailableError if it does not."""
        self._r.ping()

    # --- tenants and API keys ------------------------------------------------------------

    @_translate_errors
    def create_tenant(self, name: str) -> tuple[TenantRecord, str]:
        """Create a tenant and its first API key; return both. The key is shown only here.

        Raises InvalidRequest (field ``name``) if the name is invalid or already taken.
        """
        if not isinstance(name, str) or not TENANT_NAME_RE.fullmatch(name):
            raise InvalidRequest(
                "tenant name must be 1-64 characters of [A-Za-z0-9_.-]", field="name"
            )
        tenant_id = "t_" + secrets.token_hex(8)
        api_key, key_hash, key_id = _new_api_key()
        created_ms = _now_ms()
        created = self._run_script(
            self._create_tenant_lua,
            [
                keys.tenant_name(name),
                keys.tenant(tenant_id),
                keys.tenants(),
                keys.api_key(key_hash),
                keys.tenant_keys(tenant_id),
            ],
            [tenant_id, name, str(created_ms), key_hash, key_id],
        )
        if not created:
            raise InvalidRequest(f"tenant name {name!r} is already taken", field="name")
        return TenantRecord(tenant_id, name, created_ms), api_key

    @_translate_errors
    def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        row = self._r.hgetall(keys.tenant(tenant_id))
        return _tenant_from_hash(tenant_id, row) if row else None

    @_translate_errors
    def get_tenant_by_name(self, name: str) -> TenantRecord | None:
        tenant_id = self._r.get(keys.tenant_name(name))
        return None if tenant_id is None else self.get_tenant(tenant_id)

    @_translate_errors
    def list_tenants(self) -> list[TenantRecord]:
        """Every tenant, oldest first."""
        ids = sorted(self._r.smembers(keys.tenants()))
        pipe = self._r.pipeline(transaction=False)
        for tenant_id in ids:
            pipe.hgetall(keys.tenant(tenant_id))
        rows: list[dict[str, str]] = pipe.execute() if ids else []
        found = [_tenant_from_hash(t, row) for t, row in zip(ids, rows, strict=True) if row]
        return sorted(found, key=lambda t: (t.created_ms, t.tenant_id))

    @_translate_errors
    def delete_tenant(self, tenant_id: str) -> TenantPurge | None:
        """Delete a tenant and everything the state holds for it; None if nothing was there.

        First, in one transaction: the tenant record, its name, every API key and the usage
        totals (``vajra:usage:{tenant_id}``), so no key of it authenticates from here on; a
        tombstone (``vajra:tenant-deleted:{tenant_id}``, as long as usage is deduplicated)
        keeps usage that arrives later from recreating the totals.
        Then every adapter registry key of the tenant (``vajra:adapter:{tenant_id}:...``),
        through :func:`vajra.adapters.registry.purge_tenant_adapters`. The usage stream
        entries stay: they are the billing history. Repeating the call is harmless: it
        purges whatever registry keys appeared since (a push that was in flight).

        The returned :class:`TenantPurge` lists the object-store prefixes of the tenant's
        adapter files, which the caller deletes once no request still reads them.
        """
        from vajra.adapters.registry import purge_tenant_adapters

        _check_id(tenant_id, "tenant_id")
        tenant_key = keys.tenant(tenant_id)
        keys_set = keys.tenant_keys(tenant_id)

        def txn(pipe: Any) -> tuple[str | None, int, bool]:
            name: str | None = pipe.hget(tenant_key, "name")
            key_hashes: set[str] = pipe.smembers(keys_set)
            had_usage = bool(pipe.exists(keys.usage(tenant_id)))
            name_key = keys.tenant_name(name) if name is not None else None
            owns_name = False
            if name_key is not None:
                pipe.watch(name_key)
                owns_name = pipe.get(name_key) == tenant_id
            pipe.multi()
            pipe.delete(tenant_key, keys_set, *(keys.api_key(h) for h in key_hashes))
            pipe.delete(keys.usage(tenant_id))
            # Usage still on its way (an executor's outbox) must not recreate the totals.
            pipe.set(keys.tenant_deleted(tenant_id), "1", px=self._dedupe_ttl_ms)
            pipe.srem(keys.tenants(), tenant_id)
            if owns_name and name_key is not None:
                pipe.delete(name_key)
            return name, len(key_hashes), had_usage

        name, n_keys, had_usage = self._transaction(
            txn, tenant_key, keys_set, keys.usage(tenant_id)
        )
        removed, object_keys = purge_tenant_adapters(self._r, tenant_id)
        if name is None and not n_keys and not had_usage and not removed:
            return None
        return TenantPurge(tenant_id, name, n_keys, object_keys)

    @_translate_errors
    def create_api_key(self, tenant_id: str) -> str:
        """Issue another API key for a tenant; the key is returned only here.

        Raises NotFoundError (field ``tenant_id``) if the tenant does not exist.
        """
        api_key, key_hash, key_id = _new_api_key()
        created = self._run_script(
            self._create_api_key_lua,
            [keys.tenant(tenant_id), keys.api_key(key_hash), keys.tenant_keys(tenant_id)],
            [tenant_id, str(_now_ms()), key_hash, key_id],
        )
        if not created:
            raise NotFoundError(f"no tenant {tenant_id!r}", field="tenant_id")
        return api_key

    @_translate_errors
    def revoke_api_key(self, api_key: str) -> bool:
        """Revoke a key; returns whether it existed."""
        key_hash = _digest(api_key)
        key = keys.api_key(key_hash)

        def txn(pipe: Any) -> bool:
            tenant_id: str | None = pipe.hget(key, "tenant_id")
            pipe.multi()
            if tenant_id is None:
                return False
            pipe.delete(key)
            pipe.srem(keys.tenant_keys(tenant_id), key_hash)
            return True

        return self._transaction(txn, key)

    @_translate_errors
    def authenticate(self, api_key: str) -> TenantRecord | None:
        """The tenant an API key belongs to, or None for an unknown, revoked or orphaned key.

        The key is looked up by its SHA-256 digest, so no secret is ever compared and the
        lookup's timing reveals nothing useful about valid keys.
        """
        if (
            not isinstance(api_key, str)
            or not api_key.startswith(API_KEY_PREFIX)
            or len(api_key) > _MAX_API_KEY_LEN
        ):
            return None
        tenant_id = self._r.hget(keys.api_key(_digest(api_key)), "tenant_id")
        if tenant_id is None:
            return None
        return self.get_tenant(tenant_id)

    # --- executor heartbeats -------------------------------------------------------------

    @_translate_errors
    def write_heartbeat(self, hb: ExecutorHeartbeat, ttl_s: float) -> None:
        """Publish a heartbeat that expires after ``ttl_s`` unless written again."""
        _check_id(hb.executor_id, "executor_id")
        if not (isinstance(ttl_s, int | float) and math.isfinite(ttl_s) and ttl_s > 0):
            raise InvalidRequest("ttl_s must be a positive number", field="ttl_s")
        key = keys.executor(hb.executor_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hset(key, mapping=cast("Mapping[str | bytes, str]", _heartbeat_to_hash(hb)))
        pipe.pexpire(key, max(1, round(ttl_s * 1000)))
        pipe.sadd(keys.executors(), hb.executor_id)
        pipe.execute()

    @_translate_errors
    def list_heartbeats(self) -> list[ExecutorHeartbeat]:
        """Live heartbeats, sorted by executor id; ids whose heartbeat expired are pruned.

        A heartbeat hash that cannot be parsed is logged and skipped.
        """
        ids = sorted(self._r.smembers(keys.executors()))
        if not ids:
            return []
        pipe = self._r.pipeline(transaction=False)
        for executor_id in ids:
            pipe.hgetall(keys.executor(executor_id))
        rows: list[dict[str, str]] = pipe.execute()
        live: list[ExecutorHeartbeat] = []
        expired: list[str] = []
        for executor_id, row in zip(ids, rows, strict=True):
            if not row:
                expired.append(executor_id)
                continue
            try:
                live.append(_heartbeat_from_hash(executor_id, row))
            except (KeyError, ValueError, TypeError) as exc:
                log.warning("skipping malformed heartbeat %s: %r", keys.executor(executor_id), exc)
        if expired:
            # Only ids whose hash is still gone are removed: an executor that came back
            # between the read above and this call keeps its entry.
            self._run_script(
                self._prune_executors_lua,
                [keys.executors(), *(keys.executor(e) for e in expired)],
                expired,
            )
        return live

    # --- usage ---------------------------------------------------------------------------

    @_translate_errors
    def record_usage(self, rec: UsageRecord) -> bool:
        """Count one request's usage exactly once; returns False for a repeated event id.

        One Lua script sets the dedupe marker (kept for ``usage_dedupe_ttl_s``), adds to
        the tenant's totals and appends to the usage stream, so either all happen or none.
        An event replayed after its marker expired would be counted again.
        """
        return self.record_usage_many([rec])[0]

    @_translate_errors
    def record_usage_many(self, records: Sequence[UsageRecord]) -> list[bool]:
        """:meth:`record_usage` for a batch: one Lua call records the whole batch atomically.

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
        flags = self._record_usage_lua(keys=keys_, args=args)
        return [c == "1" for c in flags]

    @_translate_errors
    def get_usage(self, tenant_id: str) -> UsageTotals:
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

    # --- predictor -----------------------------------------------------------------------

    @_translate_errors
    def record_request_event(self, adapter: str, ts_ms: int, count: int = 1) -> None:
        """Count ``count`` requests for ``adapter``; ``last_ms`` keeps the latest ``ts_ms`` seen."""
        if not isinstance(adapter, str) or not adapter:
            raise InvalidRequest("adapter must be a non-empty string", field="adapter")
        _check_non_negative_int(ts_ms, "ts_ms")
        _check_non_negative_int(count, "count")
        self._run_script(
            self._request_event_lua, [keys.predictor_adapter(adapter)], [str(ts_ms), str(count)]
        )

    @_translate_errors
    def get_adapter_stats(self, adapter: str) -> AdapterStats:
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


# --- the Trio client -----------------------------------------------------------------------


class AsyncClusterState:
    """:class:`ClusterState` for Trio: each call runs in a worker thread.

    At most ``max_threads`` calls of one instance run at once (one
    :class:`trio.CapacityLimiter`); more wait their turn. On cancellation the call in
    flight is not abandoned: it finishes (bounded by the socket timeout) and then
    ``Cancelled`` is raised, so a write is never left running behind the caller's back.
    Errors are those of the sync methods.
    """

    def __init__(self, state: ClusterState, *, max_threads: int = 4) -> None:
        self._state = state
        self._limiter = trio.CapacityLimiter(max_threads)

    @classmethod
    def from_url(cls, url: str, *, max_threads: int = 4, **options: Any) -> AsyncClusterState:
        """Build over a new :class:`ClusterState`; ``options`` go to its constructor."""
        return cls(ClusterState(url, **options), max_threads=max_threads)

    @property
    def sync(self) -> ClusterState:
        """The underlying synchronous client (for code already running in a thread)."""
        return self._state

    async def _call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self._limiter
        )

    async def aclose(self) -> None:
        await self._call(self._state.close)

    async def ping(self) -> None:
        await self._call(self._state.ping)

    async def create_tenant(self, name: str) -> tuple[TenantRecord, str]:
        return await self._call(self._state.create_tenant, name)

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        return await self._call(self._state.get_tenant, tenant_id)

    async def get_tenant_by_name(self, name: str) -> TenantRecord | None:
        return await self._call(self._state.get_tenant_by_name, name)

    async def list_tenants(self) -> list[TenantRecord]:
        return await self._call(self._state.list_tenants)

    async def delete_tenant(self, tenant_id: str) -> TenantPurge | None:
        return await self._call(self._state.delete_tenant, tenant_id)

    async def create_api_key(self, tenant_id: str) -> str:
        return await self._call(self._state.create_api_key, tenant_id)

    async def revoke_api_key(self, api_key: str) -> bool:
        return await self._call(self._state.revoke_api_key, api_key)

    async def authenticate(self, api_key: str) -> TenantRecord | None:
        return await self._call(self._state.authenticate, api_key)

    async def write_heartbeat(self, hb: ExecutorHeartbeat, ttl_s: float) -> None:
        await self._call(self._state.write_heartbeat, hb, ttl_s)

    async def list_heartbeats(self) -> list[ExecutorHeartbeat]:
        return await self._call(self._state.list_heartbeats)

    async def record_usage_many(self, records: Sequence[UsageRecord]) -> list[bool]:
        return await self._call(self._state.record_usage_many, records)

    async def record_usage(self, rec: UsageRecord) -> bool:
        return await self._call(self._state.record_usage, rec)

    async def get_usage(self, tenant_id: str) -> UsageTotals:
        return await self._call(self._state.get_usage, tenant_id)

    async def record_request_event(self, adapter: str, ts_ms: int, count: int = 1) -> None:
        await self._call(self._state.record_request_event, adapter, ts_ms, count)

    async def get_adapter_stats(self, adapter: str) -> AdapterStats:
        return await self._call(self._state.get_adapter_stats, adapter)
