"""Adapter uploads: the two files of a PEFT directory, sent as they are or in one archive.

Pure and blocking (archives are decompressed here): call from a worker thread. Nothing is
ever written to disk: archive members are read into memory, and only the two files a PEFT
LoRA adapter needs are read at all —

- ``adapter_config.json`` and ``adapter_model.safetensors``, at the archive's top level or
  inside one top-level directory (``tar czf a.tgz my-adapter/``);
- other regular files and directories (PEFT's ``README.md``) are skipped, never read;
- links, devices, absolute paths, ``..`` components, encrypted zip members, two copies of
  one file, more than :data:`MAX_MEMBERS` entries are refused (400, naming the entry);
- declared sizes are checked before anything is decompressed, and reads are bounded, so an
  archive that lies about its sizes or expands without bound is refused with 413.

Archives are recognised by their content (gzip, zip or plain tar magic), not their names.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

from vajra.client._adapter_files import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from vajra.http._errors import ApiError

#: Entries an archive may hold (files and directories together).
MAX_MEMBERS = 64
_WANTED = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
_PICKLE = "adapter_model.bin"


@dataclass(frozen=True, slots=True)
class AdapterFiles:
    config_json: bytes
    weights: bytes

    @property
    def size_bytes(self) -> int:
        return len(self.config_json) + len(self.weights)


def too_large(
    size: int, max_bytes: int, what: str = "the adapter", *, field: str | None = None
) -> ApiError:
    return ApiError(
        413, "payload_too_large", f"{what} has {size} bytes; the limit is {max_bytes}", field=field
    )


def check_size(files: AdapterFiles, max_bytes: int) -> AdapterFiles:
    """413 when config + weights exceed ``max_bytes`` (the gateway's ``max_adapter_bytes``)."""
    if files.size_bytes > max_bytes:
        raise too_large(files.size_bytes, max_bytes)
    return files


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message, field="archive")


def _role(name: str) -> str | None:
    """Which wanted file entry ``name`` is (None: skip it); refuses unsafe names."""
    if "\\" in name or "\x00" in name:
        raise _bad(f"archive entry {name!r} has an unsafe name")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise _bad(f"archive entry {name!r} is outside the archive (absolute or '..')")
    parts = [p for p in path.parts if p != "."]
    if not parts or len(parts) > 2:
        return None
    return parts[-1] if parts[-1] in (*_WANTED, _PICKLE) else None


class _Collector:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.declared = 0
        self.entries = 0
        self.found: dict[str, bytes] = {}
        self.saw_pickle = False

    def entry(self, name: str, declared_size: int) -> str | None:
        """Count one entry; its role when it must be read, else None."""
        self.entries += 1
        if self.entries > MAX_MEMBERS:
            raise _bad(f"the archive has more than {MAX_MEMBERS} entries")
        self.declared += max(0, declared_size)
        if self.declared > self.max_bytes:
            raise too_large(self.declared, self.max_bytes, "the unpacked archive", field="archive")
        role = _role(name)
        if role == _PICKLE:
            self.saw_pickle = True
            return None
        if role is not None and role in self.found:
            raise _bad(f"the archive holds two {role} files")
        return role

    def read(self, role: str, stream: IO[bytes] | None, name: str) -> None:
        if stream is None:
            raise _bad(f"archive entry {name!r} cannot be read")
        data = stream.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise too_large(len(data), self.max_bytes, "the unpacked archive", field="archive")
        self.found[role] = data

    def result(self) -> AdapterFiles:
        for wanted in _WANTED:
            if wanted not in self.found:
                if wanted == ADAPTER_WEIGHTS_FILE and self.saw_pickle:
                    raise _bad(
                        "the archive holds adapter_model.bin (a pickle); only safetensors is "
                        "accepted: save with safe_serialization=True"
                    )
                raise _bad(f"the archive has no {wanted} (at its top level or one folder down)")
        return AdapterFiles(self.found[ADAPTER_CONFIG_FILE], self.found[ADAPTER_WEIGHTS_FILE])


def _from_tar(data: bytes, max_bytes: int) -> AdapterFiles:
    c = _Collector(max_bytes)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                if member.isdir():
                    c.entry(member.name, 0)
                    continue
                if not member.isfile():
                    raise _bad(f"archive entry {member.name!r} is a link or a special file")
                role = c.entry(member.name, member.size)
                if role is not None:
                    c.read(role, tar.extractfile(member), member.name)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise _bad(f"the archive is not a readable .tar.gz: {exc}") from exc
    return c.result()


def _from_zip(data: bytes, max_bytes: int) -> AdapterFiles:
    c = _Collector(max_bytes)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                mode = info.external_attr >> 16
                if info.is_dir():
                    c.entry(info.filename, 0)
                    continue
                if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                    raise _bad(f"archive entry {info.filename!r} is a link or a special file")
                if info.flag_bits & 0x1:
                    raise _bad(f"archive entry {info.filename!r} is encrypted")
                role = c.entry(info.filename, info.file_size)
                if role is not None:
                    with archive.open(info) as stream:
                        c.read(role, stream, info.filename)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error) as exc:
        raise _bad(f"the archive is not a readable .zip: {exc}") from exc
    except NotImplementedError as exc:  # an unsupported compression method
        raise _bad(f"the archive uses an unsupported .zip feature: {exc}") from exc
    return c.result()


def is_tar(data: bytes) -> bool:
    return data[:2] == b"\x1f\x8b" or data[257:262] == b"ustar"


def is_zip(data: bytes) -> bool:
    return data[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def unpack_archive(data: bytes, *, max_bytes: int) -> AdapterFiles:
    """The two adapter files inside a .tar.gz (or .tar) or .zip archive; see the module doc."""
    if is_zip(data):
        return check_size(_from_zip(data, max_bytes), max_bytes)
    if is_tar(data):
        return check_size(_from_tar(data, max_bytes), max_bytes)
    raise _bad("archive must be a .tar.gz or a .zip holding a PEFT adapter directory")
