"""The adapter registry's records in Redis: tenants' adapter names, versions, active pointers.

Every key lives under ``vajra:adapter:{tenant_id}:`` (:mod:`vajra.state.keys`), so tenants
never share a key: a lookup for another tenant's name reads keys that do not exist and answers
exactly like a name never pushed (:class:`~vajra.errors.NotFoundError`, same message).
:class:`AdapterRecords` is the only writer of these keys; names, references and the records
it returns are defined in :mod:`vajra.adapters.versions` (no I/O).

Versions of one name are numbered 1, 2, 3, ... and never reused while the name exists;
:meth:`AdapterRecords.register` makes the new version active. Deleting the active version
makes the newest remaining one active; deleting the last version deletes the name. Every
update is one Lua script, so no reader sees half of one.

Objects: versions point at content-addressed objects (``adapters/<tenant>/<sha256>``). A
per-tenant reference count per digest, kept by the same scripts, tells the caller when the
last version using an object is gone (``Deletion.freed_object_keys``), so it can remove the
files. Deleting a whole tenant removes its keys too (:mod:`vajra.state.tenant_purge`).

Errors: as :mod:`vajra.state.connection`, naming "the adapter registry"; InvalidRequest
naming the field for bad arguments (before anything is written).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vajra.adapters.versions import (
    ADAPTER_NAME_RE,
    AdapterVersion,
    Deletion,
    ResolvedAdapter,
    check_adapter_name,
    not_found,
    parse_adapter_ref,
)
from vajra.errors import InternalError, InvalidRequest, NotFoundError, QuotaExceeded
from vajra.state import keys
from vajra.state.connection import Connection, KeyOwner, translate_errors
from vajra.state.fields import check_id, now_ms

__all__ = ["AdapterRecords"]

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")

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


class AdapterRecords(KeyOwner):
    """The registry's Redis I/O; thread-safe (one connection pool). No I/O until used."""

    what = "the adapter registry"

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._register_lua = conn.script(_REGISTER_LUA)
        self._resolve_lua = conn.script(_RESOLVE_LUA)
        self._delete_lua = conn.script(_DELETE_LUA)

    def _keys(self, tenant_id: str, name: str) -> list[str]:
        return [
            keys.adapter_names(tenant_id),
            keys.adapter(tenant_id, name),
            keys.adapter_refs(tenant_id),
            keys.adapter_versions(tenant_id, name),
        ]

    @translate_errors
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
        check_id(tenant_id, "tenant_id")
        check_adapter_name(name)
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise InvalidRequest("digest must be 64 lowercase hex characters", field="digest")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise InvalidRequest("rank must be a positive integer", field="rank")
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
            raise InvalidRequest("size_bytes must be a non-negative integer", field="size_bytes")
        created_ms = now_ms()
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

    @translate_errors
    def check_quota(self, tenant_id: str, name: str, max_names: int, max_versions: int) -> None:
        """Raise QuotaExceeded if registering a version of ``name`` now would pass a limit.

        A read before the upload is stored, so a refused push leaves no files behind;
        :meth:`register` checks again, atomically.
        """
        check_id(tenant_id, "tenant_id")
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

    @translate_errors
    def get(self, tenant_id: str, name: str, version: int | None = None) -> AdapterVersion:
        """One version (the active one when ``version`` is None); NotFoundError if none."""
        check_id(tenant_id, "tenant_id")
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

    @translate_errors
    def delete(self, tenant_id: str, name: str, version: int | None = None) -> Deletion:
        """Delete one version, or (``version`` None) every version and the name itself.

        NotFoundError (field ``adapter``) when the tenant has no such adapter or version.
        """
        check_id(tenant_id, "tenant_id")
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

    # Last: the method named ``list`` shadows the builtin for annotations below it.
    @translate_errors
    def list(self, tenant_id: str) -> list[AdapterVersion]:
        """Every version of every adapter of the tenant, by name then version."""
        check_id(tenant_id, "tenant_id")
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
