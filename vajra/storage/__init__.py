"""The object store for adapter files: a local directory (embedded default) or S3.

::

    store = open_store(cfg)             # from the [storage] config section
    store.put("adapters/t_1/abc/x", b"...")  # blocking (CLI, threads)
    data = await store.aget("adapters/t_1/abc/x")  # Trio, never blocks the loop

Adapters are stored content-addressed under ``adapters/<tenant_id>/<sha256>/`` as the two
files of the PEFT format (see :mod:`vajra.storage.adapters`); training datasets and
checkpoints under ``datasets/<tenant_id>/`` and ``checkpoints/<tenant_id>/`` (see
:mod:`vajra.storage.tenant_files`).
"""

from __future__ import annotations

from pathlib import Path

from vajra.config import VajraConfig
from vajra.errors import InvalidRequest
from vajra.storage.adapters import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    adapter_object_key,
    adapter_object_keys,
    adelete_adapter_objects,
    aget_adapter_objects,
    aput_adapter_objects,
    delete_adapter_objects,
    get_adapter_objects,
    put_adapter_objects,
    tenant_objects_prefix,
)
from vajra.storage.base import ObjectStore, check_key
from vajra.storage.local import LocalObjectStore
from vajra.storage.s3 import S3ObjectStore
from vajra.storage.tenant_files import (
    adelete_prefix,
    adelete_tenant_objects,
    checkpoint_object_key,
    dataset_object_key,
    dataset_prefix,
    delete_tenant_objects,
    job_checkpoints_prefix,
)

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "LocalObjectStore",
    "ObjectStore",
    "S3ObjectStore",
    "adapter_object_key",
    "adapter_object_keys",
    "adelete_adapter_objects",
    "adelete_prefix",
    "adelete_tenant_objects",
    "aget_adapter_objects",
    "aput_adapter_objects",
    "check_key",
    "checkpoint_object_key",
    "dataset_object_key",
    "dataset_prefix",
    "delete_adapter_objects",
    "delete_tenant_objects",
    "get_adapter_objects",
    "job_checkpoints_prefix",
    "open_store",
    "put_adapter_objects",
    "tenant_objects_prefix",
]


def open_store(cfg: VajraConfig) -> ObjectStore:
    """The object store the configuration names; does no I/O until first used."""
    s = cfg.storage
    if s.kind == "local":
        root = Path(s.local_dir).expanduser() if s.local_dir else cfg.cluster.home_path / "objects"
        return LocalObjectStore(root)
    if s.kind == "s3":
        if not s.s3_bucket:
            raise InvalidRequest("storage.s3_bucket must be set", field="storage.s3_bucket")
        return S3ObjectStore(
            bucket=s.s3_bucket,
            endpoint=s.s3_endpoint,
            region=s.s3_region,
            access_key_id=s.s3_access_key_id,
            secret_access_key=s.s3_secret_access_key,
            connect_timeout_s=s.s3_connect_timeout_s,
            read_timeout_s=s.s3_read_timeout_s,
            op_timeout_s=s.s3_op_timeout_s,
            max_attempts=s.s3_max_attempts,
        )
    raise InvalidRequest(
        f"storage.kind must be 'local' or 's3', got {s.kind!r}", field="storage.kind"
    )
