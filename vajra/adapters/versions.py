"""Adapter names, versions and ``NAME[@VERSION]`` references: the registry's vocabulary.

A tenant's adapter is a name (1-64 characters of ``[A-Za-z0-9_.-]``) with versions numbered
1, 2, 3, ...; a request names ``NAME`` (the active version) or ``NAME@VERSION``. The records
here are what the registry (:mod:`vajra.state.adapters`, which keeps them in Redis) returns.
Pure code: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vajra.errors import InvalidRequest, NotFoundError

__all__ = [
    "ADAPTER_NAME_RE",
    "MAX_METADATA_BYTES",
    "MAX_VERSION",
    "SOURCES",
    "AdapterVersion",
    "Deletion",
    "ResolvedAdapter",
    "check_adapter_name",
    "check_metadata",
    "not_found",
    "parse_adapter_ref",
]

ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Adapter names: 1-64 characters of letters, digits, ``_``, ``.`` and ``-`` (case-sensitive)."""

MAX_VERSION = 2**53
"""The largest version number a reference may name."""

SOURCES = ("push", "train", "merge")
"""Where a version came from: an upload, a fine-tuning job, a merge of two versions."""

MAX_METADATA_BYTES = 16_384
"""The most JSON bytes each of a version's ``hyperparams`` and ``metrics`` may take."""

_DATASET_DIGEST_RE = re.compile(r"[A-Za-z0-9:._-]{0,128}")


@dataclass(frozen=True, slots=True)
class ResolvedAdapter:
    """What a request for ``NAME`` or ``NAME@VERSION`` is served with, fixed at admission."""

    name: str
    version: int
    digest: str
    object_key: str
    rank: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class AdapterVersion:
    """One registered version of a tenant's adapter."""

    name: str
    version: int
    digest: str  # sha256 hex over adapter_config.json then adapter_model.safetensors
    object_key: str  # prefix in the object store holding both files
    rank: int  # the largest rank over the adapter's modules
    lora_alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    base_model: str
    created_ms: int
    active: bool = False
    # Version metadata (docs/hot-swap.md): the version it continues from (by default the one
    # active when it was registered), what it was trained on and with, how it ended.
    parent_version: int | None = None
    dataset_digest: str = ""
    hyperparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = "push"  # one of SOURCES
    staged: bool = False  # registered but never active yet (a swap in progress, or kept aside)

    def resolved(self) -> ResolvedAdapter:
        return ResolvedAdapter(
            self.name, self.version, self.digest, self.object_key, self.rank, self.size_bytes
        )


@dataclass(frozen=True, slots=True)
class Deletion:
    """What deleting versions of an adapter removed."""

    versions: tuple[AdapterVersion, ...]
    freed_object_keys: tuple[str, ...]  # objects no remaining version of the tenant uses


def not_found(ref: str) -> NotFoundError:
    """The one answer for an adapter that does not exist *for this tenant*, whoever owns it."""
    return NotFoundError(f"adapter {ref!r} not found", field="adapter")


def check_adapter_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise InvalidRequest("adapter name must be 1-64 characters of [A-Za-z0-9_.-]", field=field)
    return name


def parse_adapter_ref(ref: object) -> tuple[str, int | None]:
    """``"NAME"`` -> (NAME, None); ``"NAME@7"`` -> (NAME, 7). InvalidRequest (field ``adapter``)."""
    if not isinstance(ref, str):
        raise InvalidRequest("adapter must be NAME or NAME@VERSION", field="adapter")
    name, at, version = ref.partition("@")
    check_adapter_name(name, "adapter")
    if not at:
        return name, None
    if not (version.isascii() and version.isdigit()) or not 1 <= int(version) <= MAX_VERSION:
        raise InvalidRequest(
            "adapter version must be a positive integer: NAME@VERSION", field="adapter"
        )
    return name, int(version)


def check_metadata(
    *,
    parent_version: object = None,
    dataset_digest: object = "",
    hyperparams: object = None,
    metrics: object = None,
    source: object = "push",
) -> tuple[str, str]:
    """Check a version's metadata; returns ``(hyperparams, metrics)`` as compact JSON.

    Raises InvalidRequest naming the field: a parent that is not a positive version number, a
    dataset digest outside ``[A-Za-z0-9:._-]{0,128}``, hyperparams or metrics that are not a
    JSON object with string keys (finite numbers only) or exceed :data:`MAX_METADATA_BYTES`,
    an unknown source.
    """
    if parent_version is not None and (
        isinstance(parent_version, bool)
        or not isinstance(parent_version, int)
        or not 1 <= parent_version <= MAX_VERSION
    ):
        raise InvalidRequest("parent_version must be a positive integer", field="parent_version")
    if not isinstance(dataset_digest, str) or not _DATASET_DIGEST_RE.fullmatch(dataset_digest):
        raise InvalidRequest(
            "dataset_digest must be up to 128 characters of [A-Za-z0-9:._-]",
            field="dataset_digest",
        )
    if source not in SOURCES:
        raise InvalidRequest(f"source must be one of {', '.join(SOURCES)}", field="source")
    return _json_object(hyperparams, "hyperparams"), _json_object(metrics, "metrics")


def _json_object(value: object, name: str) -> str:
    if value is None:
        return "{}"
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise InvalidRequest(f"{name} must be a JSON object with string keys", field=name)
    try:
        text = json.dumps(dict(value), separators=(",", ":"), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{name} is not plain JSON: {exc}", field=name) from None
    if len(text.encode()) > MAX_METADATA_BYTES:
        raise InvalidRequest(f"{name} takes over {MAX_METADATA_BYTES} bytes as JSON", field=name)
    return text
