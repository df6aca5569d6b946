"""A finished training job's adapter, published: PEFT files, a staged version, a warm swap.

Data flows left to right::

    trained tensors ─PEFT files (validated)─▶ object store ─register (staged)─▶ Redis
    ─AdapterSwap─▶ scheduler ─AdapterSwapDone─▶ ─activate (compare-and-set)─▶ Redis

The files are validated exactly like an upload (:func:`~vajra.adapters.format.validate_adapter`
against the base model, ``adapters.max_rank``, ``adapters.max_adapter_bytes``), stored
content-addressed, then registered as the next version of the job's adapter *staged*
(``NAME@VERSION`` answers, ``NAME`` still the old one) with its parent version, the dataset's
digest, the hyperparameters and the metrics. The scheduler then has every executor that holds
the old version load the new one (:mod:`vajra.actors.scheduler_swaps`), and the active pointer
flips whatever the warm phase's outcome (a slow executor only costs one cold load). A flip
that finds another version active than the one seen (a concurrent push or rollback) is
retried once against the new one.

Errors: InvalidAdapter when the trained adapter fails validation (nothing stored),
QuotaExceeded when the tenant is at its version limit, the store's and registry's errors
otherwise; the caller fails the job with them.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from vajra.actors.executor_job_io import JobIO, UsesJobIO
from vajra.adapters.format import AdapterManifest, base_model_spec, validate_adapter
from vajra.adapters.versions import AdapterVersion
from vajra.bus.messages import AdapterSwap, AdapterSwapDone
from vajra.config import VajraConfig
from vajra.errors import InvalidRequest, NotFoundError
from vajra.policies.training import TrainParams
from vajra.state.jobs import JobRecord
from vajra.storage import adapter_object_key
from vajra.storage.adapters import aput_adapter_objects

log = logging.getLogger("vajra.executor.jobs")

#: How long a job waits for the scheduler's answer to its warm swap.
SWAP_TIMEOUT_S = 30.0

SwapFn = Callable[[AdapterSwap], Awaitable[AdapterSwapDone]]

__all__ = ["SWAP_TIMEOUT_S", "Publisher", "SwapFn", "peft_files"]


def peft_files(
    cfg: VajraConfig, tensors: Mapping[str, Any], config: Mapping[str, Any]
) -> tuple[bytes, bytes, AdapterManifest]:
    """The adapter's ``adapter_config.json`` and ``adapter_model.safetensors`` bytes and their
    manifest, validated like an upload. Blocking: run it in a worker thread."""
    from safetensors.torch import save

    weights = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    config_json = json.dumps(dict(config), sort_keys=True).encode()
    base = base_model_spec(Path(cfg.cluster.model))
    manifest = validate_adapter(
        config_json,
        weights,
        base,
        max_rank=cfg.adapters.max_rank,
        max_bytes=cfg.adapters.max_adapter_bytes,
    )
    return config_json, weights, manifest


class Publisher(UsesJobIO):
    """Publishes trained adapters for one executor (see the module docstring)."""

    def __init__(self, io: JobIO, *, swap: SwapFn, base_model: str) -> None:
        super().__init__(io)
        self.swap = swap
        self.base_model = base_model

    async def publish(
        self,
        rec: JobRecord,
        params: TrainParams,
        tensors: Mapping[str, Any],
        config: Mapping[str, Any],
        metrics: Mapping[str, Any],
    ) -> int:
        """Store, register staged, warm-swap and activate; the new version's number."""
        config_json, weights, manifest = await trio.to_thread.run_sync(
            peft_files, self.cfg, tensors, config
        )
        object_key = adapter_object_key(rec.tenant_id, manifest.digest)
        await aput_adapter_objects(self.store, object_key, config_json, weights)
        registry = self.state.adapters
        active = await self._active(rec)
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            version = await self.redis.run(
                functools.partial(
                    registry.register,
                    rec.tenant_id,
                    rec.adapter,
                    digest=manifest.digest,
                    object_key=object_key,
                    rank=manifest.rank,
                    lora_alpha=manifest.lora_alpha,
                    target_modules=list(manifest.target_modules),
                    size_bytes=manifest.size_bytes,
                    base_model=self.base_model,
                    max_names=self.cfg.adapters.max_adapters_per_tenant,
                    max_versions=self.cfg.adapters.max_versions_per_adapter,
                    activate=False,
                    parent_version=rec.from_version,
                    dataset_digest=rec.dataset_digest,
                    hyperparams=params.to_dict(),
                    metrics=dict(metrics),
                    source="train",
                )
            )
        swap = AdapterSwap(
            swap_id=f"{rec.job_id}.{uuid.uuid4().hex[:8]}",
            tenant_id=rec.tenant_id,
            name=rec.adapter,
            from_digest=active.digest if active is not None else "",
            to_version=version.version,
            to_digest=manifest.digest,
            to_object_key=object_key,
            wait_ms=int(SWAP_TIMEOUT_S * 1000),
        )
        done = await self.swap(swap)
        if not done.ok:
            log.warning(
                "job %s: warm swap incomplete (%s): %s", rec.job_id, done.not_warmed, done.error
            )
        try:
            await self._activate(rec, version.version, active)
        except InvalidRequest:  # another swap moved the pointer meanwhile: once more
            await self._activate(rec, version.version, await self._active(rec))
        log.info("job %s: %s@%d active", rec.job_id, rec.adapter, version.version)
        return version.version

    async def _active(self, rec: JobRecord) -> AdapterVersion | None:
        """The adapter's active version now (None: the name has none yet)."""
        try:
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                return await self.redis.run(self.state.adapters.get, rec.tenant_id, rec.adapter)
        except NotFoundError:
            return None

    async def _activate(self, rec: JobRecord, version: int, seen: AdapterVersion | None) -> None:
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            await self.redis.run(
                functools.partial(
                    self.state.adapters.activate,
                    rec.tenant_id,
                    rec.adapter,
                    version,
                    expect_active=seen.version if seen is not None else 0,
                )
            )
