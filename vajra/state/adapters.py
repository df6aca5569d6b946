"""The adapter registry's records in Redis: tenants' adapter names, versions, active pointers.

Every key lives under ``vajra:adapter:{tenant_id}:`` (:mod:`vajra.state.keys`), so tenants
never share a key: a lookup for another tenant's name reads keys that do not exist and answers
exactly like a name never pushed (:class:`~vajra.errors.NotFoundError`, same message).
:class:`AdapterRecords` is the only writer of these keys; names, references and the records
it returns are defined in :mod:`vajra.adapters.versions` (no I/O).

Versions of one name are numbered 1, 2, 3, ... and never reused while the name exists;
:meth:`AdapterRecords.register` makes the new version active, or (``activate=False``) stages
it: it answers ``NAME@VERSION`` but not ``NAME`` until :meth:`AdapterRecords.activate` moves
the pointer, a compare-and-set on the version active before, so two swaps of one name cannot
interleave (the warm hot swap, docs/hot-swap.md, stages, warms, then activates). Deleting the
active version makes the newest remaining version that was ever active the active one (the
newest staged one if there is none); deleting the last version deletes the name. Every update
is one Lua script (:mod:`vajra.state.adapter_scripts`), so no reader sees half of one.

Objects: versions point at content-addressed objects (``adapters/<tenant>/<sha256>``). A
per-tenant reference count per digest, kept by the same scripts, tells the caller when the
last version using an object is gone (``Deletion.freed_object_keys``), so it can remove the
files. Deleting a whole tenant removes its keys too (:mod:`vajra.state.tenant_purge`).

Errors: as :mod:`vajra.state.connection`, naming "the adapter registry"; InvalidRequest
naming the field for bad arguments (before anything is written).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from vajra.adapters.versions import (
    ADAPTER_NAME_RE,
    MAX_VERSION,
    AdapterVersion,
    Deletion,
    ResolvedAdapter,
    check_adapter_name,
    check_metadata,
    not_found,
    parse_adapter_ref,
)
from vajra.errors import InternalError, InvalidRequest, NotFoundError, QuotaExceeded
from vajra.state import keys
from vajra.state.adapter_scripts import ACTIVATE_LUA, DELETE_LUA, REGISTER_LUA, RESOLVE_LUA
from vajra.state.connection import Connection, KeyOwner, translate_errors
from vajra.state.fields import check_id, now_ms

__all__ = ["AdapterRecords"]

_DIGEST_RE = re.compile(r"[0-9a-f]{64}")


class AdapterRecords(KeyOwner):
    """The registry's Redis I/O; thread-safe (one connection pool). No I/O until used."""

    what = "the adapter registry"

    def __init__(self, conn: Connection) -> None:
        super().__init__(conn)
        self._register_lua = conn.script(REGISTER_LUA)
        self._activate_lua = conn.script(ACTIVATE_LUA)
        self._resolve_lua = conn.script(RESOLVE_LUA)
        self._delete_lua = conn.script(DELETE_LUA)

    def _keys(self, tenant_id: str, name: str) -> list[str]:
        return [
            keys.adapter_names(tenant_id),
            keys.adapter(tenant_id, name),
            keys.adapter_refs(tenant_id),
            keys.adapter_versions(tenant_id, name),
        ]

    @translate_errors
    def register(
        self,
        tenant_id: str,
        name: str,
        *,
        digest: str,
        object_key: str,
        rank: int,
        lora_alpha: float,
        target_modules: Sequence[str],
        size_bytes: int,
        base_model: str,
        max_names: int = 0,
        max_versions: int = 0,
        activate: bool = True,
        parent_version: int | None = None,
        dataset_digest: str = "",
        hyperparams: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        source: str = "push",
    ) -> AdapterVersion:
        """Add the next version of ``name`` for ``tenant_id``; make it active unless
        ``activate`` is False (then it is staged: see the module docstring).

        ``parent_version`` defaults to the version active at registration (None if none).
        Raises InvalidRequest naming the field for a bad argument or metadata
        (:func:`~vajra.adapters.versions.check_metadata`), QuotaExceeded (nothing written)
        when the tenant already holds ``max_names`` names and ``name`` is new, or ``name``
        already holds ``max_versions`` versions (0: no limit); checked in the same script that
        registers, so concurrent pushes cannot pass a limit together.
        """
        check_id(tenant_id, "tenant_id")
        check_adapter_name(name)
        if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
            raise InvalidRequest("digest must be 64 lowercase hex characters", field="digest")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise InvalidRequest("rank must be a positive integer", field="rank")
        if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes < 0:
            raise InvalidRequest("size_bytes must be a non-negative integer", field="size_bytes")
        hyper_json, metrics_json = check_metadata(
            parent_version=parent_version,
            dataset_digest=dataset_digest,
            hyperparams=hyperparams,
            metrics=metrics,
            source=source,
        )
        created_ms = now_ms()
        fields = {
            "digest": digest,
            "object_key": object_key,
            "rank": str(rank),
            "lora_alpha": repr(float(lora_alpha)),
            "target_modules": json.dumps(list(target_modules)),
            "size_bytes": str(size_bytes),
            "base_model": base_model,
            "created_ms": str(created_ms),
            "dataset_digest": dataset_digest,
            "hyperparams": hyper_json,
            "metrics": metrics_json,
            "source": source,
        }
        args = [name, str(created_ms), digest, str(max(0, max_names)), str(max(0, max_versions))]
        args += ["1" if activate else "0", "" if parent_version is None else str(parent_version)]
        for k, v in fields.items():
            args += (k, v)
        version = int(self._register_lua(keys=self._keys(tenant_id, name), args=args))
        if version < 0:
            raise _quota_error(version, name, max_names, max_versions)
        return self.get(tenant_id, name, version)

    @translate_errors
    def activate(
        self, tenant_id: str, name: str, version: int, *, expect_active: int | None = None
    ) -> AdapterVersion:
        """Make ``version`` the active one, atomically; returns it (``active`` True).

        ``expect_active``: the version the caller saw active (0: none); when another is
        active now, nothing is written and InvalidRequest (field ``version``) says a
        concurrent swap moved the pointer. None: no check. NotFoundError (field ``adapter``)
        when the tenant has no such version, whoever else has.
        """
        check_id(tenant_id, "tenant_id")
        ref = f"{name}@{version}"
        if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
            raise not_found(ref)
        _check_version(version, "version")
        if expect_active is not None and expect_active != 0:
            _check_version(expect_active, "expect_active")
        out = self._activate_lua(
            keys=[keys.adapter(tenant_id, name), keys.adapter_versions(tenant_id, name)],
            args=[str(version), "" if expect_active is None else str(expect_active)],
        )
        status = int(out[0])
        if status == -1:
            raise not_found(ref)
        if status == -2:
            raise InvalidRequest(
                f"adapter {name!r}: version {out[1]} became active meanwhile (expected "
                f"{expect_active}); another swap moved the pointer, look again",
                field="version",
            )
        it = iter(out[2:])
        return _version_from_row(name, {**dict(zip(it, it, strict=True)), "active": str(version)})

    @translate_errors
    def versions(self, tenant_id: str, name: str) -> list[AdapterVersion]:
        """Every version of ``name`` (oldest first), the active one flagged; NotFoundError
        (field ``adapter``) when the tenant has no such adapter, whoever else has."""
        check_id(tenant_id, "tenant_id")
        if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
            raise not_found(str(name))
        out = self._rows(tenant_id, [name])
        if not out:
            raise not_found(name)
        return out

    @translate_errors
    def check_quota(self, tenant_id: str, name: str, max_names: int, max_versions: int) -> None:
        """Raise QuotaExceeded if registering a version of ``name`` now would pass a limit.

        A read before the upload is stored, so a refused push leaves no files behind;
        :meth:`register` checks again, atomically.
        """
        check_id(tenant_id, "tenant_id")
        check_adapter_name(name)
        names_key, _, _, versions_key = self._keys(tenant_id, name)
        pipe = self._r.pipeline(transaction=False)
        pipe.sismember(names_key, name)
        pipe.scard(names_key)
        pipe.zcard(versions_key)
        known, n_names, n_versions = pipe.execute()
        if max_names > 0 and not known and int(n_names) >= max_names:
            raise _quota_error(-1, name, max_names, max_versions)
        if max_versions > 0 and int(n_versions) >= max_versions:
            raise _quota_error(-2, name, max_names, max_versions)

    @translate_errors
    def get(self, tenant_id: str, name: str, version: int | None = None) -> AdapterVersion:
        """One version (the active one when ``version`` is None); NotFoundError if none."""
        check_id(tenant_id, "tenant_id")
        ref = name if version is None else f"{name}@{version}"
        if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
            raise not_found(ref)
        row = self._resolve_lua(
            keys=[keys.adapter(tenant_id, name), keys.adapter_versions(tenant_id, name)],
            args=["" if version is None else str(version)],
        )
        if not row:
            raise not_found(ref)
        it = iter(row)
        return _version_from_row(name, dict(zip(it, it, strict=True)))

    def resolve(self, tenant_id: str, ref: str) -> ResolvedAdapter:
        """``NAME`` (the active version) or ``NAME@VERSION`` for this tenant.

        NotFoundError (field ``adapter``, message naming ``ref``) when the tenant has no such
        adapter or version, whether or not another tenant has; InvalidRequest for a malformed
        reference.
        """
        name, version = parse_adapter_ref(ref)
        try:
            return self.get(tenant_id, name, version).resolved()
        except NotFoundError:
            raise not_found(ref) from None

    @translate_errors
    def delete(self, tenant_id: str, name: str, version: int | None = None) -> Deletion:
        """Delete one version, or (``version`` None) every version and the name itself.

        NotFoundError (field ``adapter``) when the tenant has no such adapter or version.
        """
        check_id(tenant_id, "tenant_id")
        ref = name if version is None else f"{name}@{version}"
        if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
            raise not_found(ref)
        out = self._delete_lua(
            keys=self._keys(tenant_id, name), args=[name, "" if version is None else str(version)]
        )
        n = int(out[0])
        if n == 0:
            raise not_found(ref)
        rows = [json.loads(x) for x in out[1 : 1 + n]]
        freed = set(out[2 + n :])
        deleted = tuple(_version_from_row(name, row) for row in rows)
        freed_keys = sorted({v.object_key for v in deleted if v.digest in freed})
        return Deletion(versions=deleted, freed_object_keys=tuple(freed_keys))

    def _rows(self, tenant_id: str, names: Sequence[str]) -> list[AdapterVersion]:
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.hget(keys.adapter(tenant_id, name), "active")
            pipe.zrange(keys.adapter_versions(tenant_id, name), 0, -1)
        heads: list[Any] = pipe.execute()
        pipe = self._r.pipeline(transaction=False)
        wanted: list[tuple[str, str | None]] = []
        for i, name in enumerate(names):
            active, versions = heads[2 * i], heads[2 * i + 1]
            for v in versions:
                pipe.hgetall(keys.adapter_version(tenant_id, name, int(v)))
                wanted.append((name, active))
        rows: list[dict[str, str]] = pipe.execute() if wanted else []
        out = []
        for (name, active), row in zip(wanted, rows, strict=True):
            if row:  # deleted between the two reads
                out.append(_version_from_row(name, {**row, "active": active or "0"}))
        return sorted(out, key=lambda a: (a.name, a.version))

    # Last: the method named ``list`` shadows the builtin for annotations below it.
    @translate_errors
    def list(self, tenant_id: str) -> list[AdapterVersion]:
        """Every version of every adapter of the tenant, by name then version."""
        check_id(tenant_id, "tenant_id")
        names = sorted(self._r.smembers(keys.adapter_names(tenant_id)))
        return self._rows(tenant_id, names) if names else []


def _check_version(version: object, field: str) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InvalidRequest(f"{field} must be a positive integer", field=field)


def _version_from_row(name: str, row: Mapping[str, Any]) -> AdapterVersion:
    try:
        version = int(row["version"])
        targets = json.loads(row["target_modules"])
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise ValueError("target_modules is not a JSON list of strings")
        active = row.get("active")
        return AdapterVersion(
            name=name,
            version=version,
            digest=str(row["digest"]),
            object_key=str(row["object_key"]),
            rank=int(row["rank"]),
            lora_alpha=float(row["lora_alpha"]),
            target_modules=tuple(targets),
            size_bytes=int(row["size_bytes"]),
            base_model=str(row["base_model"]),
            created_ms=int(row["created_ms"]),
            active=active is not None and int(active) == version,
            parent_version=int(row["parent_version"]) if row.get("parent_version") else None,
            dataset_digest=str(row.get("dataset_digest", "")),
            hyperparams=_json_dict(row.get("hyperparams")),
            metrics=_json_dict(row.get("metrics")),
            source=str(row.get("source") or "push"),
            staged=bool(row.get("staged")),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise InternalError(f"malformed adapter record for {name!r}: {exc!r}") from exc


def _json_dict(text: object) -> dict[str, Any]:
    """A stored JSON object (records written before metadata existed have none: {})."""
    if not text:
        return {}
    value = json.loads(str(text))
    if not isinstance(value, dict):
        raise ValueError("metadata is not a JSON object")
    return value


def _quota_error(code: int, name: str, max_names: int, max_versions: int) -> QuotaExceeded:
    if code == -1:
        return QuotaExceeded(
            f"the tenant already holds {max_names} adapters; delete one to add {name!r}",
            field="name",
        )
    return QuotaExceeded(
        f"adapter {name!r} already holds {max_versions} versions; delete old ones first",
        field="name",
    )
