"""Which device each executor of ``vajra up`` runs on: GPUs round-robin, or the CPU.

``--devices 0,1`` (or ``cluster.devices``) restricts the rotation to those GPUs. GPUs are
counted by torch in a subprocess, so the supervisor itself never loads torch.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import trio

log = logging.getLogger("vajra.supervisor")

_GPU_PROBE_S = 120.0


def parse_devices(text: str) -> list[int] | None:
    """``"0,1"`` -> [0, 1]; ``""`` -> None (not chosen). ValueError names what is wrong."""
    if not text.strip():
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not (part.isascii() and part.isdigit()):
            raise ValueError(
                f"--devices must be GPU indices separated by commas (like 0,1), got {text!r}"
            )
        out.append(int(part))
    return out


def executor_devices(n: int, visible_gpus: int, chosen: Sequence[int] | None = None) -> list[str]:
    """The device of each of ``n`` executors: GPUs round-robin, or the CPU without CUDA.

    ``chosen`` (indices among the visible GPUs) restricts the rotation to those GPUs; each
    must be below ``visible_gpus`` (ValueError otherwise, or when GPUs are chosen but none
    is visible).
    """
    if n < 0:
        raise ValueError("the number of executors must not be negative")
    if chosen is not None:
        if not chosen:
            raise ValueError("--devices names no GPU")
        if visible_gpus <= 0:
            raise ValueError(f"--devices {_ids(chosen)}: no CUDA GPU is visible")
        bad = [i for i in chosen if not 0 <= i < visible_gpus]
        if bad:
            raise ValueError(
                f"--devices {_ids(chosen)}: GPU {bad[0]} is not visible "
                f"({visible_gpus} visible: 0-{visible_gpus - 1})"
            )
        return [f"cuda:{chosen[i % len(chosen)]}" for i in range(n)]
    if visible_gpus <= 0:
        return ["cpu"] * n
    return [f"cuda:{i % visible_gpus}" for i in range(n)]


def _ids(chosen: Sequence[int]) -> str:
    return ",".join(str(i) for i in chosen)


async def visible_gpu_count() -> int:
    """CUDA devices torch sees here (honouring CUDA_VISIBLE_DEVICES), probed in a subprocess
    so the supervisor itself never loads torch or touches a GPU; 0 if the probe fails."""
    code = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    with trio.move_on_after(_GPU_PROBE_S):
        done = await trio.run_process(
            [sys.executable, "-c", code], capture_stdout=True, capture_stderr=True, check=False
        )
        try:
            return max(0, int(done.stdout.decode().strip() or 0)) if done.returncode == 0 else 0
        except ValueError:
            return 0
    log.warning("probing for GPUs took over %.0fs; assuming none", _GPU_PROBE_S)
    return 0
