"""The safetensors header of an untrusted upload, parsed and bounds-checked byte by byte.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{dtype, shape, data_offsets}``, then the data. The header is parsed here without the
safetensors library, so a pickle file, a truncated upload or a header whose offsets point past
the end is refused before any tensor is decoded, and nothing outside the checked byte ranges
is ever read. The header is size-capped and decoded with bounded depth; any problem is an
:class:`~vajra.adapters.untrusted.InvalidAdapter` naming it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

from vajra.adapters.untrusted import Budget, InvalidAdapter, decode_json, show

#: safetensors dtype name -> bytes per element, for every dtype the format defines.
_ALL_SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip
#: Largest safetensors header accepted: about 150 bytes per tensor, so room for some 14,000
#: tensors, while one decode stays within milliseconds (the safetensors library allows 100 MiB).
MAX_HEADER_BYTES = 2 * 1024 * 1024
_MAX_TENSOR_NAME_CHARS = 1_024
_MAX_NDIM = 8
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, located but not decoded."""

    dtype: str  # safetensors name: F32, F16, BF16, ...
    shape: tuple[int, ...]
    start: int  # absolute byte offsets into the file
    end: int


def _is_count(value: Any) -> bool:
    """A safetensors dimension or offset: an unsigned 64-bit integer (bounding it also bounds
    the arithmetic and the messages that use it)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64


def read_safetensors_header(data: bytes, *, budget: Budget | None = None) -> dict[str, TensorInfo]:
    """Parse and bounds-check a safetensors file's header; raise InvalidAdapter naming the fault.

    The header is at most :data:`MAX_HEADER_BYTES` and is decoded with bounded depth, so no
    bytes make this raise anything but InvalidAdapter.
    """
    budget = budget or Budget(None)
    if data[:2] in _PICKLE_MAGIC or data[:4] in _PICKLE_MAGIC:
        raise InvalidAdapter("weights are a pickle/zip file (e.g. .bin or .pt), not safetensors")
    if len(data) < 8:
        raise InvalidAdapter(f"weights are not safetensors: {len(data)} bytes, no header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise InvalidAdapter(
            f"weights are not safetensors or their header is too large: header length "
            f"{header_len} bytes, the limit is {MAX_HEADER_BYTES}"
        )
    if 8 + header_len > len(data):
        raise InvalidAdapter(
            f"weights are not safetensors or truncated: header length {header_len} "
            f"exceeds the {len(data)}-byte file"
        )
    header = decode_json(
        memoryview(data)[8 : 8 + header_len], what="adapter_model.safetensors header", header=True
    )
    if not isinstance(header, dict):
        raise InvalidAdapter("weights are not safetensors: header is not a JSON object")
    base = 8 + header_len
    body = len(data) - base
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        budget.check()
        if name == "__metadata__":
            continue
        if len(name) > _MAX_TENSOR_NAME_CHARS:
            raise InvalidAdapter(
                f"tensor {show(name)} has a name of {len(name)} characters; "
                f"the limit is {_MAX_TENSOR_NAME_CHARS}"
            )
        if not isinstance(entry, dict):
            raise InvalidAdapter(f"safetensors header entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _ALL_SAFETENSORS_DTYPES:
            raise InvalidAdapter(f"tensor {name!r} has unknown dtype {show(dtype)}")
        if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(map(_is_count, shape))):
            raise InvalidAdapter(f"tensor {name!r} has a malformed shape {show(shape)}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]
        ):
            raise InvalidAdapter(f"tensor {name!r} has malformed data_offsets {show(offsets)}")
        if offsets[1] > body:
            raise InvalidAdapter(
                f"safetensors data truncated: tensor {name!r} ends at byte {offsets[1]} "
                f"of a {body}-byte data section"
            )
        want = math.prod(shape) * _ALL_SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != want:
            raise InvalidAdapter(
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} {dtype} "
                f"(expected {want})"
            )
        out[name] = TensorInfo(dtype, tuple(shape), base + offsets[0], base + offsets[1])
    return out
