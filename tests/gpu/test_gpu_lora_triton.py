"""The Triton multi-LoRA kernels: in Triton's interpreter on the CPU, and on a GPU when present.

Rules: the interpreter must be switched on before triton is first imported, so that check runs
in a fresh process (``TRITON_INTERPRET=1``) on the packed batch of tests/gpu/lora_kit.py:
mixed ranks and targets, decode tokens, two prefill chunks, base and uncovered tokens, float32;
then the static (CUDA-graph) form of a decode batch, whose slots are device data.
Most of its time is the process's imports; the kernels themselves take a couple of seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.gpu.lora_kit import check_packed_batch, mixed_pool, packed_deltas, static_check
from vajra.gpu.lora import HostAdapter, LoraBatchState, LoraPool

REPO = Path(__file__).resolve().parents[2]


def test_triton_kernels_in_the_interpreter_equal_torch_and_a_per_token_reference() -> None:
    pytest.importorskip("triton")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "tests.gpu.lora_kit"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "triton interpreter: ok" in done.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_on_the_gpu_equal_the_torch_path(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    pool, names, adapters = mixed_pool()
    cuda_pool = LoraPool(
        pool.layout, device="cuda", dtype=dtype, max_vram_adapters=4, max_rank=64, mean_rank=48
    )
    moved = {}
    for name, slot in names.items():
        host = adapters[slot].host
        converted = HostAdapter(host.digest, host.ranks, host.buffer.to(dtype).pin_memory())
        moved[name] = cuda_pool.load(converted)
    cuda_pool.synchronize()
    for mode in ("auto", "gather", "segmented"):
        triton_state = LoraBatchState(cuda_pool, mode=mode, backend="triton")  # type: ignore[arg-type]
        torch_state = LoraBatchState(cuda_pool, mode=mode, backend="torch")  # type: ignore[arg-type]
        got, want = packed_deltas(triton_state, moved), packed_deltas(torch_state, moved)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        for module, delta in want.items():
            assert (got[module] - delta).abs().max().item() <= tol * max(
                1.0, delta.abs().max().item()
            )
    if dtype == torch.float32:
        by_slot = {moved[name]: adapters[slot] for name, slot in names.items()}
        check_packed_batch(LoraBatchState(cuda_pool, backend="triton"), moved, by_slot, tol=1e-5)
        static_check(cuda_pool, by_slot)
