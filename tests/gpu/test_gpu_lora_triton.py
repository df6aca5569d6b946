"""The Triton multi-LoRA kernels: in Triton's interpreter on the CPU, and on a GPU when present.

Rules: the interpreter must be switched on before triton is first imported, so that check runs
in a fresh process (``TRITON_INTERPRET=1``) on the packed batch of tests/gpu/lora_kit.py:
mixed ranks and targets, decode tokens, two prefill chunks, base and uncovered tokens, float32;
then the static (CUDA-graph) form of a decode batch, whose slots are device data.
Most of its time is the process's imports; the kernels themselves take a couple of seconds.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.interpreter import assert_passes_in_interpreter
from tests.gpu.lora_kit import check_packed_batch, mixed_pool, packed_deltas, static_check
from vajra.gpu.lora import HostAdapter, LoraBatchState, LoraPool


def test_triton_kernels_in_the_interpreter_equal_torch_and_a_per_token_reference() -> None:
    assert_passes_in_interpreter("tests.gpu.lora_kit", "triton interpreter: ok")


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
