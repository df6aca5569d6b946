"""Adapters in the SDK, blocking side: push (a directory, bytes, tensors), versions, rollback,
merge, list and delete. The Trio side is :class:`vajra.client.AsyncClient`'s own methods.

Errors: as every SDK call (typed :class:`~vajra.errors.VajraError`); an upload over the
gateway's limit is refused before it is sent (PayloadTooLarge).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from vajra.client._adapter_files import adapter_bytes_from_tensors, read_adapter_dir
from vajra.client._calls import AdapterMetadata
from vajra.client._requests import check_upload_size
from vajra.client._types import AdapterInfo

if TYPE_CHECKING:
    from vajra.client._sync import Client

__all__ = ["AdaptersMixin"]


class AdaptersMixin:
    """The blocking client's adapter methods (:class:`~vajra.client.Client` has them)."""

    def push_adapter(
        self, path: str | os.PathLike[str], name: str, *, timeout_s: float | None = None
    ) -> AdapterInfo:
        """Upload the PEFT adapter in directory ``path`` as the next (active) version of ``name``.

        The gateway validates it before storing anything; a refused adapter raises
        InvalidRequest naming the problem.
        """
        config_json, weights = read_adapter_dir(path)
        return self.push_adapter_bytes(config_json, weights, name, timeout_s=timeout_s)

    def push_adapter_bytes(
        self,
        config_json: bytes,
        weights: bytes,
        name: str,
        *,
        timeout_s: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        hyperparams: Mapping[str, Any] | None = None,
        dataset_digest: str = "",
        activate: bool = True,
    ) -> AdapterInfo:
        """Like :meth:`push_adapter`, from the bytes of ``adapter_config.json`` and
        ``adapter_model.safetensors``; the metadata as in :meth:`push_adapter_tensors`."""
        c = cast("Client", self)
        meta = AdapterMetadata(activate, dataset_digest, hyperparams, metrics)
        call = c._calls.push_adapter(config_json, weights, name, timeout_s, meta)
        check_upload_size(config_json, weights, self._upload_limit(call.timeout_s))
        return c._run(call)

    def _upload_limit(self, timeout_s: float) -> int:
        """The gateway's upload limit (asked once per client; 0 if it does not say)."""
        c = cast("Client", self)
        if c._max_upload_bytes is None:
            c._max_upload_bytes = c._run(c._calls.upload_limit(timeout_s))
        return c._max_upload_bytes

    def push_adapter_tensors(
        self,
        name: str,
        tensors: Mapping[str, Any],
        lora_config: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        hyperparams: Mapping[str, Any] | None = None,
        dataset_digest: str = "",
        activate: bool = True,
        timeout_s: float | None = None,
    ) -> AdapterInfo:
        """Push an adapter held in memory as the next version (see
        :meth:`AsyncClient.push_adapter_tensors <vajra.client.AsyncClient.push_adapter_tensors>`)."""
        config_json, weights = adapter_bytes_from_tensors(tensors, lora_config)
        return self.push_adapter_bytes(
            config_json,
            weights,
            name,
            timeout_s=timeout_s,
            metrics=metrics,
            hyperparams=hyperparams,
            dataset_digest=dataset_digest,
            activate=activate,
        )

    def versions(self, name: str, *, timeout_s: float | None = None) -> list[AdapterInfo]:
        """Every version of ``name``, oldest first (NotFoundError when there is none)."""
        c = cast("Client", self)
        return c._run(c._calls.versions(name, timeout_s))

    def rollback(self, name: str, version: int, *, timeout_s: float | None = None) -> AdapterInfo:
        """Make ``version`` of ``name`` active again, the warm way; returns it."""
        c = cast("Client", self)
        return c._run(c._calls.rollback(name, version, timeout_s))

    def merge(
        self,
        name: str,
        versions: tuple[int, int],
        weights: tuple[float, float] = (0.5, 0.5),
        *,
        activate: bool = True,
        timeout_s: float | None = None,
    ) -> AdapterInfo:
        """Register the exact weighted sum of two versions of ``name`` as its next version
        (:mod:`vajra.adapters.merge`), active the warm way unless ``activate`` is False."""
        c = cast("Client", self)
        return c._run(c._calls.merge(name, versions, weights, activate, timeout_s))

    def list_adapters(self, *, timeout_s: float | None = None) -> list[AdapterInfo]:
        """Every version of every adapter of this key's tenant, by name then version."""
        c = cast("Client", self)
        return c._run(c._calls.list_adapters(timeout_s))

    def delete_adapter(
        self, name: str, version: int | None = None, *, timeout_s: float | None = None
    ) -> list[AdapterInfo]:
        """Delete one version (``version``, or ``name`` as ``NAME@VERSION``) or the whole name.

        Returns the deleted versions; NotFoundError if there is no such adapter or version.
        """
        c = cast("Client", self)
        return c._run(c._calls.delete_adapter(name, version, timeout_s))
