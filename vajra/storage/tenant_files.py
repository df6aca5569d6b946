"""Where a tenant's files live in the object store, and removing all of them.

Three kinds, each under a prefix that starts with its kind and then the tenant id, so one
listing per kind finds everything a tenant owns (and a bucket policy can keep tenants apart):

* adapters: ``adapters/<tenant_id>/<sha256>/`` (:mod:`vajra.storage.adapters`);
* training datasets: ``datasets/<tenant_id>/<sha256>.jsonl``, content-addressed (uploaded
  through the gateway), or any key under ``datasets/<tenant_id>/`` (an ``s3://`` dataset);
* training checkpoints: ``checkpoints/<tenant_id>/<job_id>/<step>.safetensors``.

Deleting a tenant removes all three (:func:`adelete_tenant_objects`); a running job whose
record was purged removes its own checkpoints (:func:`adelete_prefix`), since it may write
one after the gateway's pass.
"""

from __future__ import annotations

from vajra.storage.adapters import tenant_objects_prefix
from vajra.storage.base import ObjectStore, check_key

__all__ = [
    "adelete_prefix",
    "adelete_tenant_objects",
    "checkpoint_object_key",
    "dataset_object_key",
    "dataset_prefix",
    "delete_tenant_objects",
    "job_checkpoints_prefix",
    "tenant_prefixes",
]


def dataset_prefix(tenant_id: str) -> str:
    """The prefix under which every dataset of ``tenant_id`` lives."""
    return check_key(f"datasets/{tenant_id}") + "/"


def dataset_object_key(tenant_id: str, sha256_hex: str) -> str:
    """Where an uploaded dataset with this content digest is stored."""
    return check_key(f"{dataset_prefix(tenant_id)}{sha256_hex}.jsonl")


def job_checkpoints_prefix(tenant_id: str, job_id: str) -> str:
    """The prefix under which every checkpoint of one training job lives."""
    return check_key(f"checkpoints/{tenant_id}/{job_id}") + "/"


def checkpoint_object_key(tenant_id: str, job_id: str, step: int) -> str:
    """Where the checkpoint of ``job_id`` after optimizer step ``step`` is stored."""
    return check_key(f"{job_checkpoints_prefix(tenant_id, job_id)}{step}.safetensors")


def tenant_prefixes(tenant_id: str) -> tuple[str, ...]:
    """Every prefix that holds files of ``tenant_id``: adapters, datasets, checkpoints."""
    return (
        tenant_objects_prefix(tenant_id),
        dataset_prefix(tenant_id),
        check_key(f"checkpoints/{tenant_id}") + "/",
    )


def delete_tenant_objects(store: ObjectStore, tenant_id: str) -> int:
    """Remove every file of a deleted tenant (adapters, datasets, checkpoints); how many.
    Blocking; a store error propagates (a repeat removes what is left)."""
    removed = 0
    for prefix in tenant_prefixes(tenant_id):
        keys = store.list_keys(prefix)
        for key in keys:
            store.delete(key)
        removed += len(keys)
    return removed


async def adelete_prefix(store: ObjectStore, prefix: str) -> int:
    """Remove every object under ``prefix`` from Trio; how many. A store error propagates."""
    keys = await store.alist_keys(prefix)
    for key in keys:
        await store.adelete(key)
    return len(keys)


async def adelete_tenant_objects(store: ObjectStore, tenant_id: str) -> int:
    """:func:`delete_tenant_objects` from Trio."""
    removed = 0
    for prefix in tenant_prefixes(tenant_id):
        removed += await adelete_prefix(store, prefix)
    return removed
