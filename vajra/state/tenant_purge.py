"""Deleting a tenant: everything the cluster state holds for it, across every key owner.

First, in one WATCH/MULTI/EXEC transaction: the tenant record, its name, every API key and the
usage totals (``vajra:usage:{tenant_id}``), so no key of it authenticates from here on; a
tombstone (``vajra:tenant-deleted:{tenant_id}``, kept as long as usage is deduplicated) keeps
usage that arrives later from recreating the totals. Then every adapter registry key of the
tenant (``vajra:adapter:{tenant_id}:...``): one Lua script removes what the tenant's names set
reaches, then a SCAN removes anything it did not reach (a record written by a push that raced
with the purge). The usage stream entries stay: they are the billing history. Repeating the
purge is harmless: it removes whatever registry keys appeared since (a push that was in
flight). Last, the tenant's training jobs (:func:`vajra.state.jobs.purge_tenant_jobs`):
records, index, active set, queue and lease entries; and the predictor's request counts of
its adapters (``vajra:predictor:adapter:{tenant}/...``). The object-store files (adapters,
datasets, checkpoints) are the caller's to delete (:func:`vajra.storage.adelete_tenant_objects`);
a job still running learns of the purge at its next lease renewal and removes its own
checkpoints.
:meth:`vajra.state.tenants.Tenants.delete` is the way in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import redis

from vajra.state import keys
from vajra.state.connection import Connection
from vajra.state.fields import check_id
from vajra.state.jobs import purge_tenant_jobs

__all__ = ["TenantPurge", "purge_tenant"]

_SCAN_BATCH = 500


@dataclass(frozen=True, slots=True)
class TenantPurge:
    """What deleting a tenant removed, and what is left for the caller.

    ``object_keys`` are the object-store prefixes of the tenant's adapter files (see
    :func:`vajra.storage.adapter_object_key`): the state no longer refers to them, and the
    caller deletes them (``vajra.storage.delete_adapter_objects``) once no request still
    reads them.
    """

    tenant_id: str
    name: str | None  # None: no tenant record was left, only keys of it were purged
    api_keys: int  # API keys revoked
    object_keys: tuple[str, ...]


# KEYS: names set, refs hash; ARGV: the tenant's key prefix (``vajra:adapter:{t}:``).
# Deletes every name's hash, versions zset and version hashes, then the set and the refs.
# Returns {number of keys deleted, object keys of the deleted versions...}.
_PURGE_ADAPTERS_LUA = """
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


def purge_tenant(conn: Connection, tenant_id: str, *, tombstone_ttl_ms: int) -> TenantPurge | None:
    """Delete a tenant and everything the state holds for it; None if nothing was there.

    Redis errors propagate as redis-py exceptions (the caller translates them).
    """
    check_id(tenant_id, "tenant_id")
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
        pipe.set(keys.tenant_deleted(tenant_id), "1", px=tombstone_ttl_ms)
        pipe.srem(keys.tenants(), tenant_id)
        if owns_name and name_key is not None:
            pipe.delete(name_key)
        return name, len(key_hashes), had_usage

    name, n_keys, had_usage = conn.transaction(txn, tenant_key, keys_set, keys.usage(tenant_id))
    removed, object_keys = _purge_adapters(conn, tenant_id)
    removed += purge_tenant_jobs(conn, tenant_id)
    removed += _purge_predictor(conn, tenant_id)
    if name is None and not n_keys and not had_usage and not removed:
        return None
    return TenantPurge(tenant_id, name, n_keys, object_keys)


def _purge_predictor(conn: Connection, tenant_id: str) -> int:
    """Delete the predictor's request counts of ``tenant_id``'s adapters (after the tombstone
    is set, so a count arriving later cannot recreate one); how many keys went."""
    client = conn.client
    removed = 0
    batch: list[str] = []
    for key in client.scan_iter(
        match=keys.predictor_adapter(f"{tenant_id}/") + "*", count=_SCAN_BATCH
    ):
        batch.append(key)
        if len(batch) >= _SCAN_BATCH:
            removed += int(client.delete(*batch))
            batch = []
    if batch:
        removed += int(client.delete(*batch))
    return removed


def _purge_adapters(conn: Connection, tenant_id: str) -> tuple[int, tuple[str, ...]]:
    """Delete every registry key of ``tenant_id``; return (keys deleted, object keys freed).

    The object keys are those of every deleted version (sorted, without repeats), including
    any version hash the SCAN finds (its object key is read before it is deleted).
    """
    client = conn.client
    prefix = keys.adapter_tenant_prefix(tenant_id)
    purge = conn.script(_PURGE_ADAPTERS_LUA)
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
