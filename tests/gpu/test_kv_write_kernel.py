"""The KV write kernel against the torch path's two ``index_copy_`` calls.

Rules: the kernel's check runs under Triton's interpreter in a fresh process
(:mod:`tests.gpu.interpreter`) on CPU tensors: keys and values with the strides the attention
passes (a transposed view of one merged projection), GQA and head sizes that are not a power
of two, float32, float16 and bfloat16 (equal bit for bit: it is a copy), slots in any order
across blocks, no tokens; and nothing but the given slots written. In-process: what is
refused. The CUDA test is marked ``gpu`` and skipped without a device.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.interpreter import assert_passes_in_interpreter
from vajra.gpu.kv_write_kernel import write_kv


def check_writes(device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    for kv_heads, head_dim in ((2, 16), (3, 24), (1, 64)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            blocks, size, tokens = 6, 4, 7
            dims = (blocks, size, kv_heads, head_dim)
            k_cache = torch.randn(dims, generator=gen).to(device, dtype)
            v_cache = torch.randn(dims, generator=gen).to(device, dtype)
            # one merged projection [1, T, (heads + 2 kv_heads) x D], viewed as the attention
            # does: [T, kv_heads, D] slices with a row stride of the whole projection
            heads = 2 * kv_heads
            merged = torch.randn(1, tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
            merged = merged.to(device, dtype)
            shape = (1, tokens, -1, head_dim)
            _, k, v = (
                t.view(shape).transpose(1, 2)
                for t in merged.split([heads * head_dim, *(2 * [kv_heads * head_dim])], -1)
            )
            new_k, new_v = k[0].transpose(0, 1), v[0].transpose(0, 1)
            slots = torch.randperm(blocks * size, generator=gen)[:tokens].to(device)
            want_k, want_v = k_cache.clone(), v_cache.clone()
            want_k.view(-1, kv_heads, head_dim).index_copy_(0, slots, new_k)
            want_v.view(-1, kv_heads, head_dim).index_copy_(0, slots, new_v)
            write_kv(k_cache, v_cache, slots, new_k, new_v)
            assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), (kv_heads, dtype)
            write_kv(k_cache, v_cache, slots[:0], new_k[:0], new_v[:0])  # no tokens: nothing
            assert torch.equal(k_cache, want_k)


def test_kernel_in_the_interpreter_equals_index_copy() -> None:
    assert_passes_in_interpreter("tests.gpu.test_kv_write_kernel", "kv write interpreter: ok")


def test_mismatched_inputs_are_refused() -> None:
    pytest.importorskip("triton")
    cache = torch.zeros(2, 4, 2, 8)
    new, slots = torch.zeros(3, 2, 8), torch.arange(3)
    for args, match in (
        ((cache, cache[:1], slots, new, new), "differ"),
        ((cache, cache.transpose(2, 3).contiguous().transpose(2, 3), slots, new, new), "contig"),
        ((cache, cache, slots, new[:, :1], new), "slots of"),
        ((cache, cache, slots, new, new.double()), "slots of"),
        ((cache, cache, slots.int(), new, new), "int64"),
    ):
        with pytest.raises(ValueError, match=match):
            write_kv(*args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_on_the_gpu_equals_index_copy() -> None:
    pytest.importorskip("triton")
    check_writes("cuda")


if __name__ == "__main__":
    check_writes("cpu")
    print("kv write interpreter: ok")
