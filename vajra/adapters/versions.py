"""Adapter names, versions and ``NAME[@VERSION]`` references: the registry's vocabulary.

A tenant's adapter is a name (1-64 characters of ``[A-Za-z0-9_.-]``) with versions numbered
1, 2, 3, ...; a request names ``NAME`` (the active version) or ``NAME@VERSION``. The records
here are what the registry (:mod:`vajra.state.adapters`, which keeps them in Redis) returns.
Pure code: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vajra.errors import InvalidRequest, NotFoundError

__all__ = [
    "ADAPTER_NAME_RE",
    "MAX_VERSION",
    "AdapterVersion",
    "Deletion",
    "ResolvedAdapter",
    "check_adapter_name",
    "not_found",
    "parse_adapter_ref",
]

ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Adapter names: 1-64 characters of letters, digits, ``_``, ``.`` and ``-`` (case-sensitive)."""

MAX_VERSION = 2**53
"""The largest version number a reference may name."""


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
