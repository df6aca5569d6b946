"""Tenants in Redis: creating, reading, listing and deleting them (``vajra:tenant*``).

A tenant has a generated id (``t_`` + hex), a unique name and a creation time; it is
created together with its first API key (:mod:`vajra.state.api_keys`) in one Lua script.
Deleting one removes everything the state holds for it (:mod:`vajra.state.tenant_purge`).
Errors: as :mod:`vajra.state.connection`; bad arguments raise InvalidRequest naming the
field, before anything is written.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from vajra.errors import InternalError, InvalidRequest
from vajra.state import keys
from vajra.state.api_keys import mint_api_key
from vajra.state.connection import Connection, KeyOwner, translate_errors
from vajra.state.fields import now_ms
from vajra.state.tenant_purge import TenantPurge, purge_tenant

__all__ = ["TENANT_NAME_RE", "TenantRecord", "Tenants"]

TENANT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Tenant names: 1-64 characters of letters, digits, ``_``, ``.`` and ``-`` (case-sensitive)."""


@dataclass(frozen=True, slots=True)
class TenantRecord:
    tenant_id: str
    name: str
    created_ms: int


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


def _tenant_from_hash(tenant_id: str, row: Mapping[str, str]) -> TenantRecord:
    try:
        return TenantRecord(tenant_id, row["name"], int(row["created_ms"]))
    except (KeyError, ValueError) as exc:
        raise InternalError(f"malformed tenant record {keys.tenant(tenant_id)}: {exc}") from exc


class Tenants(KeyOwner):
    """The tenants of the cluster. Thread-safe; no I/O until used.

    ``tombstone_ttl_ms``: how long a deleted tenant's tombstone keeps late usage from
    recreating its totals (as long as usage events are deduplicated).
    """

    def __init__(self, conn: Connection, *, tombstone_ttl_ms: int) -> None:
        super().__init__(conn)
        self._tombstone_ttl_ms = tombstone_ttl_ms
        self._create_lua = conn.script(_CREATE_TENANT_LUA)

    @translate_errors
    def create(self, name: str) -> tuple[TenantRecord, str]:
        """Create a tenant and its first API key; return both. The key is shown only here.

        Raises InvalidRequest (field ``name``) if the name is invalid or already taken.
        """
        if not isinstance(name, str) or not TENANT_NAME_RE.fullmatch(name):
            raise InvalidRequest(
                "tenant name must be 1-64 characters of [A-Za-z0-9_.-]", field="name"
            )
        tenant_id = "t_" + secrets.token_hex(8)
        api_key, key_hash, key_id = mint_api_key()
        created_ms = now_ms()
        created = self._create_lua(
            keys=[
                keys.tenant_name(name),
                keys.tenant(tenant_id),
                keys.tenants(),
                keys.api_key(key_hash),
                keys.tenant_keys(tenant_id),
            ],
            args=[tenant_id, name, str(created_ms), key_hash, key_id],
        )
        if not int(created):
            raise InvalidRequest(f"tenant name {name!r} is already taken", field="name")
        return TenantRecord(tenant_id, name, created_ms), api_key

    @translate_errors
    def get(self, tenant_id: str) -> TenantRecord | None:
        row = self._r.hgetall(keys.tenant(tenant_id))
        return _tenant_from_hash(tenant_id, row) if row else None

    @translate_errors
    def get_by_name(self, name: str) -> TenantRecord | None:
        tenant_id = self._r.get(keys.tenant_name(name))
        return None if tenant_id is None else self.get(tenant_id)

    @translate_errors
    def delete(self, tenant_id: str) -> TenantPurge | None:
        """Delete a tenant and everything the state holds for it; None if nothing was there.

        See :mod:`vajra.state.tenant_purge`. The returned :class:`TenantPurge` lists the
        object-store prefixes of the tenant's adapter files, which the caller deletes once no
        request still reads them. Safe to repeat.
        """
        return purge_tenant(self._conn, tenant_id, tombstone_ttl_ms=self._tombstone_ttl_ms)

    # Last: the method named ``list`` shadows the builtin for annotations below it.
    @translate_errors
    def list(self) -> list[TenantRecord]:
        """Every tenant, oldest first."""
        ids = sorted(self._r.smembers(keys.tenants()))
        pipe = self._r.pipeline(transaction=False)
        for tenant_id in ids:
            pipe.hgetall(keys.tenant(tenant_id))
        rows: list[dict[str, str]] = pipe.execute() if ids else []
        found = [_tenant_from_hash(t, row) for t, row in zip(ids, rows, strict=True) if row]
        return sorted(found, key=lambda t: (t.created_ms, t.tenant_id))
