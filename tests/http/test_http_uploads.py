"""Adapter archives, unpacked in memory: what is read, what is skipped, what is refused.

Pure: no cluster, no sockets, nothing written to disk but the archives' own bytes.
"""

from __future__ import annotations

import gzip
import io
import stat
import tarfile
import zipfile

import pytest

from vajra.http._errors import ApiError
from vajra.http._uploads import MAX_MEMBERS, AdapterFiles, check_size, unpack_archive

CONFIG = b'{"peft_type": "LORA", "r": 4}'
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
LIMIT = 4096


def _tar(entries: list[tarfile.TarInfo | tuple[str, bytes]], *, gz: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return buf.getvalue()


def _zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def _refused(data: bytes, status: int = 400) -> str:
    with pytest.raises(ApiError) as info:
        unpack_archive(data, max_bytes=LIMIT)
    assert info.value.status == status, info.value.message
    assert info.value.field == "archive" or status == 413
    return info.value.message


@pytest.mark.parametrize("folder", ["", "my-adapter/", "./"])
def test_tar_gz_plain_tar_and_zip_at_top_level_or_one_folder_down(folder: str) -> None:
    entries = [
        (f"{folder}README.md", b"# skipped"),
        (f"{folder}adapter_config.json", CONFIG),
        (f"{folder}adapter_model.safetensors", WEIGHTS),
    ]
    want = AdapterFiles(CONFIG, WEIGHTS)
    assert unpack_archive(_tar(entries), max_bytes=LIMIT) == want
    assert unpack_archive(_tar(entries, gz=False), max_bytes=LIMIT) == want
    assert unpack_archive(_zip(list(entries)), max_bytes=LIMIT) == want


def test_missing_files_and_pickles_are_named() -> None:
    assert "no adapter_model.safetensors" in _refused(_tar([("adapter_config.json", CONFIG)]))
    assert "no adapter_config.json" in _refused(_zip([("adapter_model.safetensors", WEIGHTS)]))
    msg = _refused(_tar([("adapter_config.json", CONFIG), ("adapter_model.bin", b"\x80\x04")]))
    assert "pickle" in msg and "safetensors" in msg
    deep = [("a/b/adapter_config.json", CONFIG), ("a/b/adapter_model.safetensors", WEIGHTS)]
    assert "no adapter_config.json" in _refused(_tar(deep))  # two folders down: not looked at
    twice = [("adapter_config.json", CONFIG), ("x/adapter_config.json", CONFIG)]
    assert "two adapter_config.json" in _refused(_tar(twice))


@pytest.mark.parametrize(
    "name", ["../adapter_config.json", "/etc/adapter_config.json", "a/../../x", "a\\..\\x"]
)
def test_paths_leaving_the_archive_are_refused(name: str) -> None:
    for archive in (_tar([(name, CONFIG)]), _zip([(name, CONFIG)])):
        msg = _refused(archive)
        assert repr(name) in msg and ("outside the archive" in msg or "unsafe" in msg), msg


def test_links_and_special_files_are_refused() -> None:
    for kind in (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE):
        link = tarfile.TarInfo("adapter_model.safetensors")
        link.type = kind
        link.linkname = "/etc/passwd"
        msg = _refused(_tar([("adapter_config.json", CONFIG), link]))
        assert "link or a special file" in msg
    info = zipfile.ZipInfo("adapter_model.safetensors")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    msg = _refused(_zip([("adapter_config.json", CONFIG), (info, b"/etc/passwd")]))
    assert "link or a special file" in msg


def test_sizes_are_bounded_before_and_while_reading() -> None:
    big = b"\0" * (LIMIT + 1)
    assert _refused(_tar([("adapter_model.safetensors", big)]), 413)
    assert _refused(_zip([("adapter_model.safetensors", big)]), 413)
    # Skipped files count too: a bomb hidden in a README is not decompressed past the limit.
    assert _refused(_tar([("README.md", big), ("adapter_config.json", CONFIG)]), 413)
    # Together over the limit, each under it.
    half = b"\0" * (LIMIT // 2 + 1)
    with pytest.raises(ApiError) as info:
        unpack_archive(
            _tar([("adapter_config.json", half), ("adapter_model.safetensors", half)]),
            max_bytes=LIMIT,
        )
    assert info.value.status == 413
    with pytest.raises(ApiError):
        check_size(AdapterFiles(half, half), LIMIT)
    many = [(f"f{i}", b"") for i in range(MAX_MEMBERS + 1)]
    assert f"more than {MAX_MEMBERS}" in _refused(_tar(many))


def test_zip_lying_about_its_size_is_cut_off() -> None:
    data = bytearray(
        _zip([("adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)])
    )
    # Rewriting the declared sizes makes zipfile refuse the member (CRC / size mismatch).
    idx = data.find(b"PK\x01\x02")
    assert idx > 0
    data[idx + 24 : idx + 28] = (1).to_bytes(4, "little")  # uncompressed size in the directory
    with pytest.raises(ApiError):
        unpack_archive(bytes(data), max_bytes=LIMIT)


def test_garbage_and_broken_archives_are_400() -> None:
    assert "must be a .tar.gz or a .zip" in _refused(b"just some bytes")
    assert "not a readable" in _refused(gzip.compress(b"not a tar at all" * 40))
    good = _tar([("adapter_config.json", CONFIG), ("adapter_model.safetensors", WEIGHTS)])
    assert "not a readable" in _refused(good[: len(good) // 2])
    assert "not a readable" in _refused(b"PK\x03\x04" + b"\0" * 64)
