"""The adapter registry: tenants' adapter names, versions and active pointers, in Redis.

Every key lives under ``vajra:adapter:{tenant_id}:`` (spelled out in :mod:`vajra.state.keys`),
so tenants never share a key: a lookup for another tenant's name reads keys that do not exist
and answers exactly like a name that was never pushed (:class:`~vajra.errors.NotFoundError`,
same message). The registry is the only writer of these keys.

Versions of one name are numbered 1, 2, 3, ... and never reused while the name exists;
:meth:`AdapterRegistry.register` makes the new version active. Deleting the active version
makes the newest remaining one active; deleting the last version deletes the name. Every
update is one Lua script, so no reader sees half of one.

Objects: versions point at content-addressed objects (``adapters/<tenant>/<sha256>``). A
per-tenant reference count per digest, kept by the same scripts, tells the caller when the
last version using an object is gone (:attr:`Deletion.freed_object_keys`), so it can remove
the files.

Deleting a tenant: :func:`purge_tenant_adapters` removes every registry key of one tenant
and returns the object keys its versions pointed at (``ClusterState.delete_tenant`` calls it).

Errors: as :mod:`vajra.state.store` — UnavailableError when Redis cannot be reached,
InternalError for other Redis failures or malformed records, InvalidRequest naming the field
for bad arguments (before anything is written). Messages name no address (they reach
clients); the store's address and redis-py's message are logged instead.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis
import trio
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from vajra.errors import (
    InternalError,
    InvalidRequest,
    NotFoundError,
    QuotaExceeded,
)
from vajra.state import keys
from vajra.state.store import StoreErrors

__all__ = [
    "ADAPTER_NAME_RE",
    "AdapterRegistry",
    "AdapterVersion",
    "AsyncAdapterRegistry",
    "Deletion",
    "ResolvedAdapter",
    "check_adapter_name",
    "not_found",
    "parse_adapter_ref",
    "purge_tenant_adapters",
]

P = ParamSpec("P")
R = TypeVar("R")

ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Adapter names: 1-64 characters of letters, digits, ``_``, ``.`` and ``-`` (case-sensitive)."""

_TENANT_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_MAX_VERSION = 2**53


@dataclass(frozen=True, slots=True)
class ResolvedAdapter:
    """What a request for ``NAME`` or ``NAME@VERSION`` is served with, fixed at admission."""

    name: str
    version: int
    digest: str
    object_key: str
    rank: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """One registered version of a tenant's adapter."""

    name: str
    version: int
    digest: str  # sha256 hex over adapter_config.json then adapter_model.safetensors
    object_key: str  # prefix in the object store holding both files
    rank: int  # the largest rank over the adapter's modules
    lora_alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    base_model: str
    created_ms: int
    active: bool = False

    def resolved(self) -> ResolvedAdapter:
        return ResolvedAdapter(
            self.name, self.version, self.digest, self.object_key, self.rank, self.size_bytes
        )


@dataclass(frozen=True, slots=True)
class Deletion:
    """What :meth:`AdapterRegistry.delete` removed."""

    versions: tuple[AdapterVersion, ...]
    freed_object_keys: tuple[str, ...]  # objects no remaining version of the tenant uses


def not_found(ref: str) -> NotFoundError:
    """The one answer for an adapter that does not exist *for this tenant*, whoever owns it."""
    return NotFoundError(f"adapter {ref!r} not found", field="adapter")


def check_adapter_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise InvalidRequest("adapter name must be 1-64 characters of [A-Za-z0-9_.-]", field=field)
    return name


def parse_adapter_ref(ref: object) -> tuple[str, int | None]:
    """``"NAME"`` -> (NAME, None); ``"NAME@7"`` -> (NAME, 7). InvalidRequest (field ``adapter``)."""
    if not isinstance(ref, str):
        raise InvalidRequest("adapter must be NAME or NAME@VERSION", field="adapter")
    name, at, version = ref.partition("@")
    check_adapter_name(name, "adapter")
    if not at:
        return name, None
    if not (version.isascii() and version.isdigit()) or not 1 <= int(version) <= _MAX_VERSION:
        raise InvalidRequest(
            "adapter version must be a positive integer: NAME@VERSION", field="adapter"
        )
    return name, int(version)


def _check_tenant(tenant_id: object) -> str:
    if not isinstance(tenant_id, str) or not _TENANT_ID_RE.fullmatch(tenant_id):
        raise InvalidRequest(
            "tenant_id must be 1-128 characters of [A-Za-z0-9_.-]", field="tenant_id"
        )
    return tenant_id


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# --- Lua scripts ----------------------------------------------------------------------------
# Version keys are built inside the scripts from the name key (``<name key>:v:<version>``), so
# each update is one script even though the new version number is only known there.

# KEYS: names set, name hash, refs hash, versions zset
# ARGV: name, created_ms, digest, max names, max versions (0: no limit), then the version
# hash's field/value pairs. Returns the new version, or -1 (the tenant holds max names
# already and this is a new one) or -2 (this name holds max versions already).
_REGISTER_LUA = """
local max_names, max_versions = tonumber(ARGV[4]), tonumber(ARGV[5])
if max_names > 0 and redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0
   and redis.call('SCARD', KEYS[1]) >= max_names then
  return -1
end
if max_versions > 0 and redis.call('ZCARD', KEYS[4]) >= max_versions then
  return -2
end
local v = redis.call('HINCRBY', KEYS[2], 'last_version', 1)
if redis.call('HEXISTS', KEYS[2], 'created_ms') == 0 then
  redis.call('HSET', KEYS[2], 'created_ms', ARGV[2])
end
redis.call('HSET', KEYS[2] .. ':v:' .. v, 'version', v, unpack(ARGV, 6))
redis.call('HSET', KEYS[2], 'active', v)
redis.call('ZADD', KEYS[4], v, v)
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
return v
"""

# KEYS: name hash, versions zset; ARGV: version ('' = the active one)
# Returns the version hash as a flat field/value list (empty if there is none).
_RESOLVE_LUA = """
local v = ARGV[1]
if v == '' then
  v = redis.call('HGET', KEYS[1], 'active')
  if not v then return {} end
end
if not redis.call('ZSCORE', KEYS[2], v) then return {} end
local row = redis.call('HGETALL', KEYS[1] .. ':v:' .. v)
table.insert(row, 'active')
table.insert(row, redis.call('HGET', KEYS[1], 'active'))
return row
"""

# KEYS: names set, name hash, refs hash, versions zset; ARGV: name, version ('' = all)
# Returns {n, row1_json..., '', freed digests...}: the deleted versions' hashes (as JSON
# objects) then the digests whose reference count reached zero. n = 0: nothing matched.
_DELETE_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then return {0} end
local versions
if ARGV[2] == '' then
  versions = redis.call('ZRANGE', KEYS[4], 0, -1)
else
  if not redis.call('ZSCORE', KEYS[4], ARGV[2]) then return {0} end
  versions = {ARGV[2]}
end
local active = redis.call('HGET', KEYS[2], 'active')
local out = {#versions}
local freed = {}
for _, v in ipairs(versions) do
  local vkey = KEYS[2] .. ':v:' .. v
  local row = redis.call('HGETALL', vkey)
  local obj = {}
  for i = 1, #row, 2 do obj[row[i]] = row[i + 1] end
  obj['active'] = active
  table.insert(out, cjson.encode(obj))
  redis.call('DEL', vkey)
  redis.call('ZREM', KEYS[4], v)
  if obj['digest'] then
    local n = redis.call('HINCRBY', KEYS[3], obj['digest'], -1)
    if n <= 0 then
      redis.call('HDEL', KEYS[3], obj['digest'])
      table.insert(freed, obj['digest'])
    end
  end
end
local newest = redis.call('ZRANGE', KEYS[4], -1, -1)
if #newest == 0 then
  redis.call('DEL', KEYS[2], KEYS[4])
  redis.call('SREM', KEYS[1], ARGV[1])
elseif (not active) or (not redis.call('ZSCORE', KEYS[4], active)) then
  redis.call('HSET', KEYS[2], 'active', newest[1])
end
table.insert(out, '')
for _, d in ipairs(freed) do table.insert(out, d) end
return out
"""


# KEYS: names set, refs hash; ARGV: the tenant's key prefix (``vajra:adapter:{t}:``).
# Deletes every name's hash, versions zset and version hashes, then the set and the refs.
# Returns {number of keys deleted, object keys of the deleted versions...}.
_PURGE_TENANT_LUA = """
local removed = 0
local objects = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local nkey = ARGV[1] .. 'name:' .. n
  for _, v in ipairs(redis.call('ZRANGE', nkey .. ':versions', 0, -1)) do
    local vkey = nkey .. ':v:' .. v
    local obj = redis.call('HGET', vkey, 'object_key')
    if obj then table.insert(objects, obj) end
    removed = removed + redis.call('DEL', vkey)
  end
  removed = removed + redis.call('DEL', nkey, nkey .. ':versions')
end
removed = removed + redis.call('DEL', KEYS[1], KEYS[2])
table.insert(objects, 1, removed)
return objects
"""

_SCAN_BATCH = 500


def purge_tenant_adapters(client: redis.Redis[str], tenant_id: str) -> tuple[int, tuple[str, ...]]:
    """Delete every registry key of ``tenant_id``; return (keys deleted, object keys freed).

    One Lua script removes what the tenant's names set reaches (names, versions, refs) at
    once; then a SCAN over ``vajra:adapter:{tenant_id}:*`` removes anything it did not
    reach (a record written by a push that raced with the purge), reading the object key
    of any version hash it finds first. The object keys are those of every deleted version
    (sorted, without repeats); the caller deletes their files from the object store.
    Redis errors propagate as redis-py exceptions (the caller translates them).
    """
    _check_tenant(tenant_id)
    prefix = keys.adapter_tenant_prefix(tenant_id)
    purge = client.register_script(_PURGE_TENANT_LUA)
    out = purge(keys=[keys.adapter_names(tenant_id), keys.adapter_refs(tenant_id)], args=[prefix])
    removed = int(out[0])
    objects = {str(o) for o in out[1:]}
    batch: list[str] = []
    for key in client.scan_iter(match=prefix + "*", count=_SCAN_BATCH):
        batch.append(key)
        if len(batch) >= _SCAN_BATCH:
            removed += _delete_leftovers(client, batch, objects)
            batch = []
    if batch:
        removed += _delete_leftovers(client, batch, objects)
    return removed, tuple(sorted(objects))


def _delete_leftovers(client: redis.Redis[str], batch: list[str], objects: set[str]) -> int:
    versions = [k for k in batch if re.search(r":v:[0-9]+$", k)]
    if versions:
        pipe = client.pipeline(transaction=False)
        for key in versions:
            pipe.hget(key, "object_key")
        objects.update(str(o) for o in pipe.execute() if o)
    return int(client.delete(*batch))


def _client_address(client: redis.Redis[str]) -> str:
    """``host:port`` (or the socket path) of a client's server, for logs."""
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return str(kw["path"])
    return f"{kw.get('host', '?')}:{kw.get('port', '?')}"


def _version_from_row(name: str, row: Mapping[str, Any]) -> AdapterVersion:
    try:
        version = int(row["version"])
        targets = json.loads(row["target_modules"])
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError("target_modules is not a JSON list of strings")
        active = row.get("active")
        return AdapterVersion(
            name=name,
            version=version,
            digest=str(row["digest"]),
            object_key=str(row["object_key"]),
            rank=int(row["rank"]),
            lora_alpha=float(row["lora_alpha"]),
            target_modules=tuple(targets),
            size_bytes=int(row["size_bytes"]),
            base_model=str(row["base_model"]),
            created_ms=int(row["created_ms"]),
            active=active is not None and int(active) == version,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise InternalError(f"malformed adapter record for {name!r}: {exc!r}") from exc


def _quota_error(code: int, name: str, max_names: int, max_versions: int) -> QuotaExceeded:
    if code == -1:
        return QuotaExceeded(
            f"the tenant already holds {max_names} adapters; delete one to add {name!r}",
            field="name",
        )
    return QuotaExceeded(
        f"adapter {name!r} already holds {max_versions} versions; delete old ones first",
        field="name",
    )


def _translate_errors(
    method: Callable[Concatenate[AdapterRegistry, P], R],
) -> Callable[Concatenate[AdapterRegistry, P], R]:
    @functools.wraps(method)
    def wrapper(self: AdapterRegistry, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise self._errors.translate(exc) from exc

    return wrapper


class AdapterRegistry:
    """Synchronous access to the registry; thread-safe (one connection pool). No I/O until used."""

    def __init__(self, client: redis.Redis[str]) -> None:
        self._r = client
        self._errors = StoreErrors("the adapter registry", _client_address(client))
        self._register_lua = client.register_script(_REGISTER_LUA)
        self._resolve_lua = client.register_script(_RESOLVE_LUA)
        self._delete_lua = client.register_script(_DELETE_LUA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        socket_timeout_s: float = 2.0,
        socket_connect_timeout_s: float = 2.0,
        retries: int = 1,
    ) -> AdapterRegistry:
        client: redis.Redis[str] = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_connect_timeout_s,
            decode_responses=True,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries, (redis.ConnectionError,)),
        )
        return cls(client)

    def close(self) -> None:
        self._r.close()

    def _keys(self, tenant_id: str, name: str) -> list[str]:
        return [
            keys.adapter_names(tenant_id),
            keys.adapter(tenant_id, name),
            keys.adapter_refs(tenant_id),
            keys.adapter_versions(tenant_id, name),
        ]

    @_translate_errors
    def register(
        self,
        tenant_id: str,
        name: str,
        *,
        digest: str,
        object_key: str,
        rank: int,
        lora_alpha: float,
        target_modules: Sequence[str],
        size_bytes: int,
        base_model: str,
        max_names: int = 0,
        max_versions: int = 0,
    ) -> AdapterVersion:
        """Add the next version of ``name`` for ``tenant_id`` and make it active.

        Raises QuotaExceeded (nothing written) when the tenant already holds ``max_names``
        names and ``name`` is new, or ``name`` already holds ``max_versions`` versions
        (0: no limit); checked in the same script that registers, so concurrent pushes
        cannot pass a limit together.
        """
        _check_tenant(tenant_id)
        check_adapter_name(name)
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise InvalidRequest("digest must be 64 lowercase hex characters", field="digest")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise InvalidRequest("rank must be a positive integer", field="rank")
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
            raise InvalidRequest("size_bytes must be a non-negative integer", field="size_bytes")
        created_ms = _now_ms()
        fields = {
            "digest": digest,
            "object_key": object_key,
            "rank": str(rank),
            "lora_alpha": repr(float(lora_alpha)),
            "target_modules": json.dumps(list(target_modules)),
            "size_bytes": str(size_bytes),
            "base_model": base_model,
            "created_ms": str(created_ms),
        }
        args = [name, str(created_ms), digest, str(max(0, max_names)), str(max(0, max_versions))]
        for k, v in fields.items():
            args += (k, v)
        version = int(self._register_lua(keys=self._keys(tenant_id, name), args=args))
        if version < 0:
            raise _quota_error(version, name, max_names, max_versions)
        return AdapterVersion(
            name=name,
            version=version,
            digest=digest,
            object_key=object_key,
            rank=rank,
            lora_alpha=float(lora_alpha),
            target_modules=tuple(target_modules),
            size_bytes=size_bytes,
            base_model=base_model,
            created_ms=created_ms,
            active=True,
        )

    @_translate_errors
    def check_quota(self, tenant_id: str, name: str, max_names: int, max_versions: int) -> None:
        """Raise QuotaExceeded if registering a version of ``name`` now would pass a limit.

        A read before the upload is stored, so a refused push leaves no files behind;
        :meth:`register` checks again, atomically.
        """
        _check_tenant(tenant_id)
        check_adapter_name(name)
        names_key, _, _, versions_key = self._keys(tenant_id, name)
        pipe = self._r.pipeline(transaction=False)
        pipe.sismember(names_key, name)
        pipe.scard(names_key)
        pipe.zcard(versions_key)
        known, n_names, n_versions = pipe.execute()
        if max_names > 0 and not known and int(n_names) >= max_names:
            raise _quota_error(-1, name, max_names, max_versions)
        if max_versions > 0 and int(n_versions) >= max_versions:
            raise _quota_error(-2, name, max_names, max_versions)

    @_translate_errors
    def get(self, tenant_id: str, name: str, version: int | None = None) -> AdapterVersion:
        """One version (the active one when ``version`` is None); NotFoundError if none."""
        _check_tenant(tenant_id)
        ref = name if version is None else f"{name}@{version}"
        if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
            raise not_found(ref)
        row = self._resolve_lua(
            keys=[keys.adapter(tenant_id, name), keys.adapter_versions(tenant_id, name)],
            args=["" if version is None else str(version)],
        )
        if not row:
            raise not_found(ref)
        it = iter(row)
        return _version_from_row(name, dict(zip(it, it, strict=True)))

    def resolve(self, tenant_id: str, ref: str) -> ResolvedAdapter:
        """``NAME`` (the active version) or ``NAME@VERSION`` for this tenant.

        NotFoundError (field ``adapter``, message naming ``ref``) when the tenant has no such
        adapter or version, whether or not another tenant has; InvalidRequest for a malformed
        reference.
        """
        name, version = parse_adapter_ref(ref)
        try:
            return self.get(tenant_id, name, version).resolved()
        except NotFoundError:
            raise not_found(ref) from None

    @_translate_errors
    def list(self, tenant_id: str) -> list[AdapterVersion]:
        """Every version of every adapter of the tenant, by name then version."""
        _check_tenant(tenant_id)
        names = sorted(self._r.smembers(keys.adapter_names(tenant_id)))
        if not names:
            return []
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.hget(keys.adapter(tenant_id, name), "active")
            pipe.zrange(keys.adapter_versions(tenant_id, name), 0, -1)
        heads: list[Any] = pipe.execute()
        pipe = self._r.pipeline(transaction=False)
        wanted: list[tuple[str, str | None]] = []
        for i, name in enumerate(names):
            active, versions = heads[2 * i], heads[2 * i + 1]
            for v in versions:
                pipe.hgetall(keys.adapter_version(tenant_id, name, int(v)))
                wanted.append((name, active))
        rows: list[dict[str, str]] = pipe.execute() if wanted else []
        out = []
        for (name, active), row in zip(wanted, rows, strict=True):
            if row:  # deleted between the two reads
                out.append(_version_from_row(name, {**row, "active": active or "0"}))
        return sorted(out, key=lambda a: (a.name, a.version))

    @_translate_errors
    def delete(self, tenant_id: str, name: str, version: int | None = None) -> Deletion:
        """Delete one version, or (``version`` None) every version and the name itself.

        NotFoundError (field ``adapter``) when the tenant has no such adapter or version.
        """
        _check_tenant(tenant_id)
        ref = name if version is None else f"{name}@{version}"
        if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
            raise not_found(ref)
        out = self._delete_lua(
            keys=self._keys(tenant_id, name), args=[name, "" if version is None else str(version)]
        )
        n = int(out[0])
        if n == 0:
            raise not_found(ref)
        rows = [json.loads(x) for x in out[1 : 1 + n]]
        freed = set(out[2 + n :])
        deleted = tuple(_version_from_row(name, row) for row in rows)
        freed_keys = sorted({v.object_key for v in deleted if v.digest in freed})
        return Deletion(versions=deleted, freed_object_keys=tuple(freed_keys))


class AsyncAdapterRegistry:
    """:class:`AdapterRegistry` for Trio: each call runs in a worker thread (``max_threads``).

    On cancellation the call in flight finishes (bounded by the socket timeout), then
    ``Cancelled`` is raised, so an update never runs on behind the caller's back.
    """

    def __init__(self, registry: AdapterRegistry, *, max_threads: int = 4) -> None:
        self.sync = registry
        self._limiter = trio.CapacityLimiter(max_threads)

    @classmethod
    def from_url(cls, url: str, *, max_threads: int = 4, **options: Any) -> AsyncAdapterRegistry:
        return cls(AdapterRegistry.from_url(url, **options), max_threads=max_threads)

    async def _call(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self._limiter
        )

    async def aclose(self) -> None:
        await self._call(self.sync.close)

    async def register(self, tenant_id: str, name: str, **fields: Any) -> AdapterVersion:
        return await self._call(self.sync.register, tenant_id, name, **fields)

    async def check_quota(
        self, tenant_id: str, name: str, max_names: int, max_versions: int
    ) -> None:
        await self._call(self.sync.check_quota, tenant_id, name, max_names, max_versions)

    async def get(self, tenant_id: str, name: str, version: int | None = None) -> AdapterVersion:
        return await self._call(self.sync.get, tenant_id, name, version)

    async def resolve(self, tenant_id: str, ref: str) -> ResolvedAdapter:
        return await self._call(self.sync.resolve, tenant_id, ref)

    async def list(self, tenant_id: str) -> list[AdapterVersion]:
        return await self._call(self.sync.list, tenant_id)

    async def delete(self, tenant_id: str, name: str, version: int | None = None) -> Deletion:
        return await self._call(self.sync.delete, tenant_id, name, version)
