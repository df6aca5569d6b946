"""Where an adapter's files live in the object store.

An adapter version is stored as the two files of the PEFT format under one content-addressed
prefix, its *object key*: ``adapters/<tenant_id>/<sha256>`` holding
``adapter_config.json`` and ``adapter_model.safetensors``. The digest is the manifest's
(sha256 over the config bytes, then the weights bytes), so pushing the same bytes again
reuses the objects. The tenant id in the prefix keeps tenants' objects apart (and lets a
bucket policy do the same).
"""

from __future__ import annotations

import re

from vajra.errors import InvalidRequest
from vajra.storage.base import ObjectStore, check_key

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
_DIGEST = re.compile(r"[0-9a-f]{64}")


def tenant_objects_prefix(tenant_id: str) -> str:
    """The prefix under which every adapter file of ``tenant_id`` lives."""
    return check_key(f"adapters/{tenant_id}") + "/"


def adapter_object_key(tenant_id: str, digest: str) -> str:
    """The object key (a prefix) of the adapter with this sha256 hex ``digest``."""
    if not _DIGEST.fullmatch(digest):
        raise InvalidRequest("digest must be 64 lowercase hex characters", field="digest")
    return f"{tenant_objects_prefix(tenant_id)}{digest}"


def adapter_object_keys(object_key: str) -> tuple[str, str]:
    """The keys of the config and weights files under ``object_key``."""
    return f"{object_key}/{ADAPTER_CONFIG_FILE}", f"{object_key}/{ADAPTER_WEIGHTS_FILE}"


def put_adapter_objects(
    store: ObjectStore, object_key: str, config_json: bytes, weights: bytes
) -> None:
    """Store both files (weights first); blocking."""
    config_key, weights_key = adapter_object_keys(object_key)
    store.put(weights_key, weights)
    store.put(config_key, config_json)


def get_adapter_objects(store: ObjectStore, object_key: str) -> tuple[bytes, bytes]:
    """``(config_json, weights)``; NotFoundError if either is missing. Blocking."""
    config_key, weights_key = adapter_object_keys(object_key)
    return store.get(config_key), store.get(weights_key)


def delete_adapter_objects(store: ObjectStore, object_key: str) -> None:
    """Remove both files; missing ones are not an error. Blocking."""
    for key in adapter_object_keys(object_key):
        store.delete(key)


async def aput_adapter_objects(
    store: ObjectStore, object_key: str, config_json: bytes, weights: bytes
) -> None:
    config_key, weights_key = adapter_object_keys(object_key)
    await store.aput(weights_key, weights)
    await store.aput(config_key, config_json)


async def aget_adapter_objects(store: ObjectStore, object_key: str) -> tuple[bytes, bytes]:
    config_key, weights_key = adapter_object_keys(object_key)
    return await store.aget(config_key), await store.aget(weights_key)


async def adelete_adapter_objects(store: ObjectStore, object_key: str) -> None:
    for key in adapter_object_keys(object_key):
        await store.adelete(key)
