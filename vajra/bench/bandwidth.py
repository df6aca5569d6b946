"""The memory-bandwidth floor of a decode step, for ``vajra bench engine`` section (b).

A decode step must read every weight once and every running row's keys and values once, so
no implementation steps faster than ``(weight bytes + KV bytes read) / bandwidth``. The
bandwidth is measured on the spot, not taken from a datasheet: a large device-to-device copy
(1 GiB on CUDA, 64 MiB on the CPU), counting bytes read plus bytes written, the median of
several copies after a warm-up. The input embedding is counted in the weights although a step
reads only its rows' entries: with the benchmark's small vocabulary that is well under 1% of
the bytes, and it only lowers the reported ratio's distance to the floor.
"""

from __future__ import annotations

import statistics
import time

import torch

from vajra.bench.lora_models import sync_device


def copy_bandwidth(device: str, *, nbytes: int | None = None, repeats: int = 9) -> float:
    """Bytes per second (read plus written) of a ``nbytes`` copy on ``device``."""
    where = torch.device(device)
    n = nbytes or ((1 << 30) if where.type == "cuda" else (64 << 20))
    source = torch.randint(0, 256, (n,), dtype=torch.uint8, device=where)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up: first touch of the pages, kernel load
    sync_device(where)
    seconds = []
    for _ in range(repeats):
        begin = time.perf_counter()
        target.copy_(source)
        sync_device(where)
        seconds.append(time.perf_counter() - begin)
    return 2 * n / statistics.median(seconds)


def decode_floor_s(
    *, weight_bytes: int, kv_bytes_per_token: int, rows: int, context: int, bandwidth: float
) -> float:
    """The fewest seconds a decode step of ``rows`` rows at ``context`` tokens can take."""
    return (weight_bytes + rows * context * kv_bytes_per_token) / bandwidth
