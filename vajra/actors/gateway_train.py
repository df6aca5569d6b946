"""Checking a training submission at the gateway, before anything is queued or stored.

A submission is refused with a typed error naming the problem, in this order (cheap checks
first, so a hostile submission costs little): the adapter name and ``from_version``/``fresh``;
the parameters (:class:`~vajra.policies.training.TrainParams` and the cluster's
:class:`~vajra.policies.training.TrainBounds`, rank at most ``adapters.max_rank``); the
tenant's limit on queued + running jobs; the adapter (unknown, or another tenant's: the same
``not_found``) or, for a fresh adapter, the tenant's adapter quota; the dataset's source and
size (``training.max_dataset_bytes``, answered ``payload_too_large``); its parsing (not JSON
Lines, a missing field, empty, too many lines: :class:`~vajra.training.dataset.InvalidDataset`
naming the line); and each line's token count against the model's context and the job's
``max_micro_tokens``, with the base model's own tokenizer (loaded once, in a worker thread).

Only then is the dataset stored, content-addressed, at ``datasets/<tenant_id>/<sha256>.jsonl``
and the job created (queued) in Redis. A dataset given as ``s3://bucket/key`` must be in the
cluster's own bucket and under ``datasets/<tenant_id>/``: the gateway reads it with the
cluster's credentials, so any other place could expose another tenant's objects; it is then
copied to its content address, so the job trains exactly the bytes that were checked.

Cancellation: a submission cancelled midway stops at its next checkpoint; a dataset already
stored stays (it is content-addressed, and purged with the tenant). Errors: VajraErrors only;
anything unexpected becomes InternalError.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from vajra.adapters.versions import check_adapter_name
from vajra.bus.messages import TrainSubmit
from vajra.config import VajraConfig
from vajra.errors import (
    InternalError,
    InvalidRequest,
    NotFoundError,
    PayloadTooLarge,
    QuotaExceeded,
    UnavailableError,
    VajraError,
)
from vajra.policies.training import (
    TrainBounds,
    TrainParams,
    check_train_params,
    total_optimizer_steps,
)
from vajra.state import ClusterState, OffLoop, TenantRecord
from vajra.state.jobs import JobRecord, new_job_id
from vajra.storage import ObjectStore, check_key, dataset_object_key, dataset_prefix
from vajra.training.dataset import Example, parse_dataset

log = logging.getLogger("vajra.gateway")

__all__ = ["TrainChecks", "train_bounds"]

#: Parameters that an existing adapter fixes: a job from one of its versions keeps them.
_SHAPE_PARAMS = ("rank", "alpha", "target_modules")
#: One tokenizer load at a time in this process (transformers' lazy imports are not
#: thread-safe; shared with the adapter desk's reads of the base model).
_TOKENIZER_LOAD = threading.Lock()


def train_bounds(cfg: VajraConfig) -> TrainBounds:
    """The cluster's limits on a job's parameters, from ``[training]`` and ``adapters.max_rank``."""
    t = cfg.training
    return TrainBounds(
        max_rank=cfg.adapters.max_rank,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        max_batch_size=t.max_batch_size,
        max_grad_accum_steps=t.max_grad_accum_steps,
        max_micro_tokens=t.max_micro_tokens,
        max_learning_rate=t.max_learning_rate,
        max_target_modules=t.max_target_modules,
    )


class TrainChecks:
    """Checks submissions and queues their jobs (module docstring); sends nothing itself."""

    def __init__(
        self, cfg: VajraConfig, state: ClusterState, store: ObjectStore, redis: OffLoop
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.store = store
        self.redis = redis
        self.bounds = train_bounds(cfg)
        self.base_model = Path(cfg.cluster.model).name if cfg.cluster.model else ""
        self._parse_limiter = trio.CapacityLimiter(max(1, cfg.training.max_concurrent_submits))
        self._tokenizer: Any = None
        self._tokenizer_error: str = ""
        self.submitted = 0

    async def submit(
        self, tenant: TenantRecord, msg: TrainSubmit, bulk: tuple[bytes, ...]
    ) -> tuple[JobRecord, str]:
        """Check ``msg`` (module docstring) and queue its job; returns the queued record and
        the digest of the version it starts from ("" for a fresh adapter)."""
        t = self.cfg.training
        tenant_id = tenant.tenant_id
        check_adapter_name(msg.adapter, "adapter")
        if msg.fresh and msg.from_version is not None:
            raise InvalidRequest(
                "give from_version or fresh, not both (fresh starts a new adapter)",
                field="from_version",
            )
        if msg.from_version is not None and (
            isinstance(msg.from_version, bool) or msg.from_version < 1
        ):
            raise InvalidRequest("from_version must be a positive integer", field="from_version")
        if not self.base_model or self.cfg.cluster.model == "null":
            raise UnavailableError("training is unavailable: the cluster serves no base model")
        params = self._params(msg.params)
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            active = await self.redis.run(self.state.jobs.active_count, tenant_id)
        if t.max_jobs_per_tenant and active >= t.max_jobs_per_tenant:
            raise QuotaExceeded(
                f"the tenant already has {active} training jobs queued or running (the limit "
                f"is {t.max_jobs_per_tenant}); wait for one to finish or cancel one",
                field="max_jobs_per_tenant",
            )
        from_version, params, digest = await self._start(tenant_id, msg, params)
        data = await self._dataset(tenant_id, msg, bulk)
        async with self._parse_limiter:
            examples = await trio.to_thread.run_sync(
                lambda: parse_dataset(
                    data, max_bytes=t.max_dataset_bytes, max_examples=t.max_examples
                )
            )
            await self._check_lengths(examples, params)
        sha = hashlib.sha256(data).hexdigest()
        key = dataset_object_key(tenant_id, sha)
        if not await self.store.aexists(key):
            await self.store.aput(key, data)
        rec = JobRecord(
            job_id=new_job_id(),
            tenant_id=tenant_id,
            adapter=msg.adapter,
            base_model=self.base_model,
            from_version=from_version,
            params=params.to_dict(),
            dataset_key=key,
            dataset_digest="sha256:" + sha,
            total_steps=total_optimizer_steps(len(examples), params),
        )
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            rec = await self.redis.run(
                self.state.jobs.create,
                rec,
                max_active=t.max_jobs_per_tenant,
                index_limit=t.max_jobs_listed,
            )
        self.submitted += 1
        log.info(
            "tenant %s queued training job %s of %s (%d examples, %d bytes)",
            tenant_id,
            rec.job_id,
            rec.adapter,
            len(examples),
            len(data),
        )
        return rec, digest

    # --- the steps ------------------------------------------------------------------------

    def _params(self, raw: object) -> TrainParams:
        if not isinstance(raw, dict):
            raise InvalidRequest("params must be an object", field="params")
        given = dict(raw)
        given.setdefault("checkpoint_every", self.cfg.training.checkpoint_every)
        params = TrainParams.from_dict(given)
        check_train_params(params, self.bounds)
        return params

    async def _start(
        self, tenant_id: str, msg: TrainSubmit, params: TrainParams
    ) -> tuple[int | None, TrainParams, str]:
        """The version the job starts from (None: fresh), the params it trains with, and the
        starting version's digest ("": fresh)."""
        a = self.cfg.adapters
        with trio.fail_after(self.cfg.bus.rpc_timeout_s):
            if not msg.fresh:
                version = await self.redis.run(
                    self.state.adapters.get, tenant_id, msg.adapter, msg.from_version
                )
            await self.redis.run(
                self.state.adapters.check_quota,
                tenant_id,
                msg.adapter,
                a.max_adapters_per_tenant,
                a.max_versions_per_adapter,
            )
        if msg.fresh:
            await trio.to_thread.run_sync(self._check_modules, params.target_modules)
            return None, params, ""
        if version.base_model and version.base_model != self.base_model:
            raise InvalidRequest(
                f"adapter {msg.adapter} version {version.version} is for base model "
                f"{version.base_model!r}; this cluster trains {self.base_model!r}",
                field="adapter",
            )
        fixed = {
            "rank": version.rank,
            "alpha": float(version.lora_alpha),
            "target_modules": tuple(version.target_modules),
        }
        for name in _SHAPE_PARAMS:
            if name in msg.params and getattr(params, name) != fixed[name]:
                raise InvalidRequest(
                    f"{name}: adapter {msg.adapter} version {version.version} has "
                    f"{name}={fixed[name]!r}, which training from it keeps; "
                    "train a fresh adapter for another",
                    field=name,
                )
        params = replace(params, **fixed)  # type: ignore[arg-type]
        check_train_params(params, self.bounds)
        return version.version, params, version.digest

    async def _dataset(self, tenant_id: str, msg: TrainSubmit, bulk: tuple[bytes, ...]) -> bytes:
        limit = self.cfg.training.max_dataset_bytes
        inline = bulk[0] if bulk else b""
        if msg.dataset_uri:
            if inline:
                raise InvalidRequest(
                    "give the dataset inline or as dataset_uri, not both", field="dataset"
                )
            key = self._tenant_s3_key(tenant_id, msg.dataset_uri)
            try:
                data = await self.store.aget(key, max_bytes=limit)
            except NotFoundError:
                raise InvalidRequest(
                    f"dataset {msg.dataset_uri} does not exist", field="dataset_uri"
                ) from None
            except PayloadTooLarge as exc:  # refused before it was read whole
                raise PayloadTooLarge(
                    f"dataset {msg.dataset_uri}: {exc.message}", field="dataset_uri"
                ) from None
        else:
            data = inline
        if len(data) > limit:
            raise PayloadTooLarge(
                f"the dataset is {len(data)} bytes, over the limit of {limit}", field="dataset"
            )
        return data

    def _tenant_s3_key(self, tenant_id: str, uri: str) -> str:
        s = self.cfg.storage
        prefix = dataset_prefix(tenant_id)
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise InvalidRequest("dataset_uri must be s3://bucket/key", field="dataset_uri")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if s.kind != "s3" or bucket != s.s3_bucket:
            raise InvalidRequest(
                "dataset_uri must name the cluster's own bucket (upload the file instead)",
                field="dataset_uri",
            )
        if not key.startswith(prefix):
            raise InvalidRequest(
                f"dataset_uri must be under s3://{bucket}/{prefix} (your tenant's prefix)",
                field="dataset_uri",
            )
        try:
            return check_key(key)
        except InvalidRequest:
            raise InvalidRequest(
                "dataset_uri's key must be '/'-separated segments of [A-Za-z0-9_.-]",
                field="dataset_uri",
            ) from None

    def _check_modules(self, modules: tuple[str, ...]) -> None:
        """A fresh adapter's modules must be linear layers of the base (when it is readable)."""
        from vajra.actors.gateway_adapters import _read_base_model

        try:
            spec = _read_base_model(self.cfg.cluster.model)
        except Exception:  # unreadable base: the tokenizer step reports it
            return
        names = {path.rsplit(".", 1)[-1] for path in spec.modules}
        for m in modules:
            if m not in names:
                raise InvalidRequest(
                    f"target module {m!r} is not a linear layer of the base model "
                    f"(it has {', '.join(sorted(names))})",
                    field="target_modules",
                )

    async def _check_lengths(self, examples: list[Example], params: TrainParams) -> None:
        """Tokenize with the base model's tokenizer: refuse a line over the context."""
        max_len = min(self.cfg.executor.max_model_len, params.max_micro_tokens)
        tokenizer = await trio.to_thread.run_sync(self._load_tokenizer)
        from vajra.gpu.training.tokenize import tokenize_examples

        try:
            await trio.to_thread.run_sync(
                lambda: tokenize_examples(examples, tokenizer, max_len=max_len)
            )
        except VajraError:
            raise
        except Exception as exc:  # a tokenizer bug must not take the gateway down
            log.exception("tokenizing a training dataset failed unexpectedly")
            raise InternalError(
                f"the dataset could not be tokenized ({type(exc).__name__}); nothing was queued"
            ) from exc

    def _load_tokenizer(self) -> Any:
        """The base model's tokenizer, loaded once (blocks: call it in a worker thread)."""
        with _TOKENIZER_LOAD:
            if self._tokenizer is None and not self._tokenizer_error:
                try:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(
                        self.cfg.cluster.model, local_files_only=True
                    )
                except Exception as exc:  # OSError, ValueError, whatever transformers raises
                    log.error("the base model's tokenizer cannot be loaded: %s", exc)
                    self._tokenizer_error = type(exc).__name__
            if self._tokenizer is None:
                raise UnavailableError(
                    "training is unavailable: the base model's tokenizer cannot be loaded"
                )
            return self._tokenizer
