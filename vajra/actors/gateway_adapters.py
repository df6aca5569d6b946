"""The gateway's adapter desk: push, list, delete, rollback and merge of a tenant's adapters,
and the resolution of ``NAME[@VERSION]`` on the request path.

Uploads are validated (in a worker thread) before anything is stored; then the files go to the
object store, then the version is registered in Redis, so a refused upload leaves no trace.

Every push (unless it asks to stay staged) and every rollback is a warm hot swap: stage, warm
the executors holding the active version, flip (:mod:`vajra.actors.gateway_swaps`).
Resolutions are cached per gateway for ``adapters.resolve_cache_ttl_s`` ("not found" for half
of it); a push or delete through this gateway clears that name at once, and a lookup under way
meanwhile is not cached. Lookups are shared: requests that miss the cache while a lookup of the
same reference is under way wait for it instead of each asking Redis.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from vajra.actors.gateway_merge import merged_files
from vajra.actors.gateway_swaps import Swapper
from vajra.actors.scheduler_swaps import SwapClient
from vajra.adapters.format import (
    AdapterManifest,
    BaseModelSpec,
    InvalidAdapter,
    base_model_spec,
    validate_adapter,
)
from vajra.adapters.versions import (
    AdapterVersion,
    ResolvedAdapter,
    check_adapter_name,
    check_metadata,
)
from vajra.bus.messages import (
    AdapterDelete,
    AdapterEntry,
    AdapterList,
    AdapterMerge,
    AdapterPush,
    AdapterReply,
    AdapterRollback,
)
from vajra.config import VajraConfig
from vajra.errors import InternalError, InvalidRequest, NotFoundError, UnavailableError, VajraError
from vajra.state import OffLoop, TenantRecord
from vajra.state.adapters import AdapterRecords
from vajra.storage import ObjectStore, adapter_object_key, adapter_object_keys
from vajra.storage.adapters import adelete_adapter_objects, aput_adapter_objects

log = logging.getLogger("vajra.gateway")

AdapterOp = AdapterPush | AdapterList | AdapterDelete | AdapterRollback | AdapterMerge


#: One read of the base model at a time in this process: the first imports transformers,
#: whose lazy module fails ("cannot import name") when two threads import it at once.
_MODEL_READ = threading.Lock()


@dataclass(slots=True)
class _Lookup:
    """One resolution under way, shared by the requests that missed the cache meanwhile."""

    done: trio.Event = field(default_factory=trio.Event)
    answered: bool = False
    resolved: ResolvedAdapter | None = None
    error: VajraError | None = None


def _name(ref: str) -> str:
    return ref.partition("@")[0]


class AdapterDesk:
    """Owns the gateway's registry and object-store work; raises VajraErrors, sends nothing."""

    def __init__(
        self,
        cfg: VajraConfig,
        registry: AdapterRecords,
        store: ObjectStore,
        *,
        swaps: SwapClient | None = None,
    ) -> None:
        """``swaps``: the link to the scheduler for warm swaps (run :meth:`serve_swaps`);
        None flips pointers without warming (tests that have no scheduler)."""
        self.cfg = cfg
        self.swapper = Swapper(cfg, registry, swaps, forget=self.forget)
        self.registry = registry
        self.redis = OffLoop()  # registry calls, off the event loop
        self.store = store
        self._resolutions: dict[tuple[str, str], dict[str, tuple[ResolvedAdapter | None, float]]]
        self._resolutions = {}
        self._lookups: dict[tuple[str, str], _Lookup] = {}  # lookups under way, by reference
        self._epoch = 0  # bumped by every forget: a lookup that began before one is not cached
        self._resolve_limiter = trio.CapacityLimiter(64)
        self.validate_limiter = trio.CapacityLimiter(max(1, cfg.adapters.max_concurrent_pushes))
        self.pushed = 0

    async def warm_up(self, limit_s: float) -> None:
        """Read the base model's module shapes (importing torch and transformers) ahead of the
        first upload, which would otherwise wait seconds for them.

        Never fails: an error is logged (the first upload reports it), and after ``limit_s``
        this stops waiting while the read goes on in its thread (the first upload waits for
        the rest). Cancellation stops the wait at once, the same way.
        """
        model = self.cfg.cluster.model
        if not model or model == "null":
            return
        with trio.move_on_after(limit_s) as waited:
            try:
                await trio.to_thread.run_sync(_read_base_model, model, abandon_on_cancel=True)
            except Exception as exc:
                log.warning("could not read the base model's modules at start: %s", exc)
        if waited.cancelled_caught:
            log.warning("reading the base model's modules took over %gs; going on", limit_s)

    # --- resolution on the request path ---------------------------------------------------

    def cached(self, tenant_id: str, ref: str) -> tuple[ResolvedAdapter | None] | None:
        """``(resolution,)`` (None inside: known not to exist) if cached and fresh, else None."""
        name = ref.partition("@")[0]
        entry = self._resolutions.get((tenant_id, name), {}).get(ref)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return (entry[0],)

    def _cache(self, tenant_id: str, ref: str, value: ResolvedAdapter | None) -> None:
        ttl = self.cfg.adapters.resolve_cache_ttl_s
        if ttl <= 0:
            return
        if len(self._resolutions) > 100_000:
            self._resolutions.clear()
        name = ref.partition("@")[0]
        self._resolutions.setdefault((tenant_id, name), {})[ref] = (
            value,
            time.monotonic() + (ttl if value is not None else ttl / 2),
        )

    def forget(self, tenant_id: str, name: str) -> None:
        """After a push or delete through this gateway, its next lookups see the change."""
        self._epoch += 1
        self._resolutions.pop((tenant_id, name), None)
        for key in [k for k in self._lookups if k[0] == tenant_id and _name(k[1]) == name]:
            del self._lookups[key]  # later requests look again; those waiting keep its answer

    def forget_tenant(self, tenant_id: str) -> None:
        """After the tenant was deleted: none of its names resolves from the cache any more."""
        self._epoch += 1
        for key in [k for k in self._lookups if k[0] == tenant_id]:
            del self._lookups[key]
        for key in [k for k in self._resolutions if k[0] == tenant_id]:
            del self._resolutions[key]

    async def resolve(self, tenant_id: str, ref: str) -> ResolvedAdapter | None:
        """Look ``ref`` up in Redis (a cache miss); None when it does not exist for the tenant.

        Raises InvalidRequest for a malformed ref, UnavailableError when Redis is unreachable.
        A lookup of the same ``ref`` already under way is waited for and its answer (or its
        error) is this one's; one that was cancelled leaves this one to ask.
        """
        key = (tenant_id, ref)
        under_way = self._lookups.get(key)
        if under_way is not None:
            await under_way.done.wait()
            if under_way.error is not None:
                raise copy.copy(under_way.error)
            if under_way.answered:
                return under_way.resolved
        flight = self._lookups[key] = _Lookup()
        epoch = self._epoch
        try:
            flight.resolved = await self._lookup(tenant_id, ref)
            flight.answered = True
        except VajraError as exc:
            flight.error = exc
            raise
        finally:
            if self._lookups.get(key) is flight:
                del self._lookups[key]
            flight.done.set()
        if epoch == self._epoch:  # no push or delete came meanwhile
            self._cache(tenant_id, ref, flight.resolved)
        return flight.resolved

    async def _lookup(self, tenant_id: str, ref: str) -> ResolvedAdapter | None:
        try:
            async with self._resolve_limiter:
                with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                    resolved: ResolvedAdapter | None = await self.redis.run(
                        self.registry.resolve, tenant_id, ref
                    )
        except NotFoundError:
            resolved = None
        except trio.TooSlowError:
            raise UnavailableError("the adapter registry is unreachable; retry") from None
        return resolved

    # --- push, list, delete ---------------------------------------------------------------

    async def handle(
        self, tenant: TenantRecord, msg: AdapterOp, bulk: tuple[bytes, ...]
    ) -> AdapterReply:
        if isinstance(msg, AdapterList):
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                if msg.name is None:
                    versions = await self.redis.run(self.registry.list, tenant.tenant_id)
                else:
                    versions = await self.redis.run(
                        self.registry.versions, tenant.tenant_id, msg.name
                    )
            return AdapterReply(msg.request_id, [_entry(v) for v in versions])
        if isinstance(msg, AdapterDelete):
            return await self._delete(tenant, msg)
        if isinstance(msg, AdapterMerge):
            config_json, weights = await merged_files(self, tenant.tenant_id, msg)
            push = AdapterPush(
                msg.request_id,
                msg.api_key,
                msg.name,
                activate=msg.activate,
                hyperparams={"merged_versions": msg.versions, "merge_weights": msg.weights},
            )
            return await self._push(
                tenant, push, (config_json, weights), source="merge", parent=msg.versions[0]
            )
        if isinstance(msg, AdapterRollback):
            check_adapter_name(msg.name)
            with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                target = await self.redis.run(
                    self.registry.get, tenant.tenant_id, msg.name, msg.version
                )
            active = await self.swap_to(tenant.tenant_id, target)
            log.info(
                "tenant %s rolled %s back to version %d", tenant.tenant_id, msg.name, msg.version
            )
            return AdapterReply(msg.request_id, [_entry(active)])
        return await self._push(tenant, msg, bulk)

    # --- the warm hot swap ----------------------------------------------------------------

    async def serve_swaps(self) -> None:
        """Run the link to the scheduler for warm swaps until cancelled (if there is one)."""
        if self.swapper.swaps is not None:
            await self.swapper.swaps.serve()

    async def swap_to(self, tenant_id: str, target: AdapterVersion) -> AdapterVersion:
        """Make ``target`` the active version the warm way (:mod:`vajra.actors.gateway_swaps`)."""
        return await self.swapper.swap_to(tenant_id, target)

    async def _delete(self, tenant: TenantRecord, msg: AdapterDelete) -> AdapterReply:
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            deletion = await self.redis.run(
                self.registry.delete, tenant.tenant_id, msg.name, msg.version
            )
        self.forget(tenant.tenant_id, msg.name)
        for object_key in deletion.freed_object_keys:
            try:
                await adelete_adapter_objects(self.store, object_key)
            except VajraError as exc:  # the registry no longer points at it: garbage only
                log.warning("could not delete adapter objects %s: %s", object_key, exc)
        return AdapterReply(msg.request_id, [_entry(v) for v in deletion.versions])

    async def _push(
        self,
        tenant: TenantRecord,
        msg: AdapterPush,
        bulk: tuple[bytes, ...],
        *,
        source: str = "push",
        parent: int | None = None,
    ) -> AdapterReply:
        """Validate (in a worker thread), then store the files, then register the version.

        Nothing is written anywhere until validation and the tenant's quotas
        (``adapters.max_adapters_per_tenant``, ``max_versions_per_adapter``) have passed, so a
        refused upload leaves no trace. Files whose registration then fails stay in the store, unreferenced (the
        same bytes pushed again reuse them).
        """
        check_adapter_name(msg.name)
        check_metadata(
            dataset_digest=msg.dataset_digest, hyperparams=msg.hyperparams, metrics=msg.metrics
        )
        if len(bulk) != 2:  # the codec checks this already; a push without both files is no push
            raise InvalidRequest("an adapter push carries adapter_config.json and the weights")
        config_json, weights = bulk
        model = self.cfg.cluster.model
        validate = functools.partial(
            _validate_upload,
            model,
            config_json,
            weights,
            max_rank=self.cfg.adapters.max_rank,
            max_bytes=self.cfg.adapters.max_adapter_bytes,
        )
        async with self.validate_limiter:
            manifest = await trio.to_thread.run_sync(validate)
        limits = (
            self.cfg.adapters.max_adapters_per_tenant,
            self.cfg.adapters.max_versions_per_adapter,
        )
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            await self.redis.run(self.registry.check_quota, tenant.tenant_id, msg.name, *limits)
        object_key = adapter_object_key(tenant.tenant_id, manifest.digest)
        await aput_adapter_objects(self.store, object_key, config_json, weights)
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            version = await self.redis.run(
                self.registry.register,
                tenant.tenant_id,
                msg.name,
                digest=manifest.digest,
                object_key=object_key,
                rank=manifest.rank,
                lora_alpha=manifest.lora_alpha,
                target_modules=list(manifest.target_modules),
                size_bytes=manifest.size_bytes,
                base_model=Path(model).name,
                max_names=limits[0],
                max_versions=limits[1],
                activate=False,
                dataset_digest=msg.dataset_digest,
                hyperparams=msg.hyperparams,
                metrics=msg.metrics,
                source=source,
                parent_version=parent,
            )
        # A concurrent delete of the last version holding the same bytes may have removed the
        # files between our put and our registration: put them back if so.
        if not await self.store.aexists(adapter_object_keys(object_key)[1]):
            await aput_adapter_objects(self.store, object_key, config_json, weights)
        self.pushed += 1
        if msg.activate:
            version = await self.swap_to(tenant.tenant_id, version)
        log.info(
            "tenant %s pushed adapter %s version %d (%s, %d bytes)",
            tenant.tenant_id,
            msg.name,
            version.version,
            manifest.digest[:12],
            manifest.size_bytes,
        )
        return AdapterReply(msg.request_id, [_entry(version)])


def _entry(v: AdapterVersion) -> AdapterEntry:
    return AdapterEntry(
        name=v.name,
        version=v.version,
        digest=v.digest,
        size_bytes=v.size_bytes,
        rank=v.rank,
        active=v.active,
        lora_alpha=v.lora_alpha,
        target_modules=list(v.target_modules),
        created_ms=v.created_ms,
        parent_version=v.parent_version,
        dataset_digest=v.dataset_digest,
        hyperparams=v.hyperparams,
        metrics=v.metrics,
        source=v.source,
        staged=v.staged,
    )


def _read_base_model(model: str) -> BaseModelSpec:
    """The base model's modules (cached after the first read; blocks: run it in a thread)."""
    with _MODEL_READ:
        return base_model_spec(Path(model))


def _validate_upload(
    model: str, config_json: bytes, weights: bytes, *, max_rank: int, max_bytes: int
) -> AdapterManifest:
    """Validate an upload against the base model in ``model`` (runs in a worker thread).

    Raises InvalidAdapter naming the problem, UnavailableError when the gateway has no
    readable base model, InternalError for anything else: never a bare exception, which would
    end the gateway's task group.
    """
    size = len(config_json) + len(weights)
    if size > max_bytes:  # refuse before even reading the base model
        raise InvalidAdapter(f"adapter is {size} bytes; the limit is {max_bytes}")
    try:
        base = _read_base_model(model)
    except Exception as exc:  # OSError, ValueError, KeyError, or whatever transformers raises
        log.error("the base model at %r cannot be read: %s", model, exc)
        raise UnavailableError(
            "adapter uploads are unavailable: the cluster's base model cannot be read"
        ) from exc
    try:
        return validate_adapter(config_json, weights, base, max_rank=max_rank, max_bytes=max_bytes)
    except VajraError:
        raise
    except Exception as exc:  # a validator bug must not take the gateway down with it
        log.exception("validating an adapter upload failed unexpectedly")
        raise InternalError(
            f"the upload could not be validated ({type(exc).__name__}); nothing was stored"
        ) from exc
