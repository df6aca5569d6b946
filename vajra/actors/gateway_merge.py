"""The gateway's side of ``vajra adapter merge``: the two versions' files, merged.

Both versions are read from the registry (another tenant's adapter is not found, as
everywhere) and their files from the object store; the merge itself
(:func:`vajra.adapters.merge.merge_versions`) runs in a worker thread under the adapter desk's
validation limiter. The result then goes through the desk's push path unchanged: validated
like any upload (``adapters.max_rank`` bounds the summed rank), stored, registered with
``source = "merge"`` and the first version as its parent, and activated the warm way.

Errors: InvalidRequest naming ``versions`` or ``weights``; NotFoundError for a missing version;
store and Redis failures as their typed errors.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import trio

from vajra.adapters.merge import check_merge_args, merge_versions
from vajra.adapters.versions import check_adapter_name
from vajra.bus.messages import AdapterMerge
from vajra.storage.adapters import aget_adapter_objects

if TYPE_CHECKING:
    from vajra.actors.gateway_adapters import AdapterDesk

__all__ = ["merged_files"]


async def merged_files(desk: AdapterDesk, tenant_id: str, msg: AdapterMerge) -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` of the merge ``msg`` asks for."""
    check_adapter_name(msg.name)
    versions, weights = check_merge_args(msg.versions, msg.weights)
    files = []
    for version in versions:
        with trio.fail_after(desk.cfg.bus.rpc_timeout_s):
            record = await desk.redis.run(desk.registry.get, tenant_id, msg.name, version)
        files.append(await aget_adapter_objects(desk.store, record.object_key))
    merge = functools.partial(merge_versions, files[0], files[1], weights)
    async with desk.validate_limiter:
        return await trio.to_thread.run_sync(merge)
