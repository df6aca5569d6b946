"""API keys in Redis: issuing, revoking and authenticating them (``vajra:apikey:*``).

A key is ``vk_`` followed by 256 random bits; only its SHA-256 hex digest is stored
(``vajra:apikey:{digest}`` -> the tenant, plus the tenant's ``vajra:tenant:{t}:keys`` set),
so the key itself is shown once, when it is issued, and never again. A tenant's first key
is issued with the tenant (:meth:`vajra.state.tenants.Tenants.create`).

Atomicity: issuing is one Lua script, revoking one WATCH/MULTI/EXEC transaction. Errors: as
:mod:`vajra.state.connection`.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING, Any

from vajra.errors import NotFoundError
from vajra.state import keys
from vajra.state.connection import Connection, KeyOwner, translate_errors
from vajra.state.fields import now_ms

if TYPE_CHECKING:
    from vajra.state.tenants import TenantRecord, Tenants

__all__ = ["API_KEY_PREFIX", "ApiKeys", "key_digest", "mint_api_key"]

API_KEY_PREFIX = "vk_"
_MAX_API_KEY_LEN = 256

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


def key_digest(api_key: str) -> str:
    """SHA-256 hex of an API key. Keys carry 256 random bits, so no slow KDF is needed."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def mint_api_key() -> tuple[str, str, str]:
    """A fresh key, its digest, and a public key id (for listing and audit logs)."""
    api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return api_key, key_digest(api_key), "key_" + secrets.token_hex(6)


class ApiKeys(KeyOwner):
    """Tenants' API keys; ``tenants`` reads the tenant a key belongs to. Thread-safe."""

    def __init__(self, conn: Connection, tenants: Tenants) -> None:
        super().__init__(conn)
        self._tenants = tenants
        self._create_lua = conn.script(_CREATE_API_KEY_LUA)

    @translate_errors
    def create(self, tenant_id: str) -> str:
        """Issue another API key for a tenant; the key is returned only here.

        Raises NotFoundError (field ``tenant_id``) if the tenant does not exist. Not safe to
        repeat blindly: each call issues one more key.
        """
        api_key, key_hash, key_id = mint_api_key()
        created = self._create_lua(
            keys=[keys.tenant(tenant_id), keys.api_key(key_hash), keys.tenant_keys(tenant_id)],
            args=[tenant_id, str(now_ms()), key_hash, key_id],
        )
        if not int(created):
            raise NotFoundError(f"no tenant {tenant_id!r}", field="tenant_id")
        return api_key

    @translate_errors
    def revoke(self, api_key: str) -> bool:
        """Revoke a key; returns whether it existed."""
        key_hash = key_digest(api_key)
        key = keys.api_key(key_hash)

        def txn(pipe: Any) -> bool:
            tenant_id: str | None = pipe.hget(key, "tenant_id")
            pipe.multi()
            if tenant_id is None:
                return False
            pipe.delete(key)
            pipe.srem(keys.tenant_keys(tenant_id), key_hash)
            return True

        return self._conn.transaction(txn, key)

    @translate_errors
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
        tenant_id = self._r.hget(keys.api_key(key_digest(api_key)), "tenant_id")
        if tenant_id is None:
            return None
        return self._tenants.get(tenant_id)
