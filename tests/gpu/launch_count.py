"""Kernels one decode forward launches, counted on the CPU.

What is counted: one forward of the engine's static decode path (what a CUDA graph captures,
:mod:`vajra.gpu.decode_graphs`), base rows only. Every aten operator that launches a kernel
on a GPU (views, reshapes and allocations left out), seen by a ``TorchDispatchMode``, plus one
per launch of the Triton kernels. With ``fused``, the engine runs what it runs on CUDA: the
fused forwards (:mod:`vajra.gpu.fused_layers`) and the paged attention's kernels, executed by
Triton's interpreter (so the process needs ``TRITON_INTERPRET=1``), the operators the
interpreter runs inside a kernel not counted. The paged decode kernel counts as the launches
its plan makes on a device of 132 processors (an H100 or H200): two when it splits.

``python -m tests.gpu.launch_count`` prints the counts of the tiny model (two layers), for the
plain forwards and, under ``TRITON_INTERPRET=1``, for the fused ones and both with LoRA;
``tests/gpu/test_fused_layers.py`` holds the fused count per layer to its figure.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Operators that launch nothing on a GPU.
FREE = {
    "aten.view", "aten.slice", "aten.transpose", "aten.unsqueeze", "aten.select",
    "aten._unsafe_view", "aten.reshape", "aten.alias", "aten.empty", "aten.new_empty",
    "aten.empty_like", "aten.as_strided", "aten.expand", "aten.t", "aten.detach",
    "aten.split_with_sizes", "aten.split", "aten.empty_strided", "aten.lift_fresh",
    "aten.squeeze", "aten.permute", "aten.is_same_size",
}  # fmt: skip
PROCESSORS = 132


class _Counting(TorchDispatchMode):
    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts
        self.inside_kernel = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        if not self.inside_kernel and name not in FREE:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_decode_forward(
    fused: bool, rows: int = 32, *, lora: bool = False
) -> tuple[int, Counter[str]]:
    """The tiny model's layers and the launches of one static decode forward of ``rows``
    rows, by operator or kernel name (see the module docstring). With ``lora``, the forward
    a graph captures for batches with adapters: the engine's LoRA pool targets all seven
    projections, and its batch state runs the Triton backend's static form (each BGMV call
    counts its two launches)."""
    from vajra.gpu import fused_layers, paged_attention, paged_decode_kernel
    from vajra.gpu.engine import TorchEngine
    from vajra.gpu.interface import GenerationRequest
    from vajra.gpu.lora import triton_kernels
    from vajra.gpu.sampling import SamplingParams
    from vajra.gpu.tiny import init_tiny_model

    counts: Counter[str] = Counter()
    mode = _Counting(counts)

    def launches(name: str, how_many: Callable[..., int], kernel: Any) -> Any:
        @functools.wraps(kernel)
        def counted(*args: Any, **kwargs: Any) -> Any:
            mode.inside_kernel += 1
            try:
                out = kernel(*args, **kwargs)
            finally:
                mode.inside_kernel -= 1
            counts[f"triton:{name}"] += how_many(*args)
            return out

        return counted

    def decode_launches(
        q: torch.Tensor, k_blocks: torch.Tensor, _: Any, tables: Any, *a: Any
    ) -> int:
        width = tables.shape[1] * k_blocks.shape[1]
        plan = paged_decode_kernel.launch_plan(
            q.shape[0], q.shape[1], k_blocks.shape[2], q.shape[2], width, PROCESSORS
        )
        return 2 if plan.splits > 1 else 1

    model_dir = init_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    engine = TorchEngine(
        model_dir, device="cpu", dtype="float32", max_batch_size=rows, max_model_len=512,
        decode_graphs="eager", fused_layers=False, max_adapters=2 if lora else 0,
    )  # fmt: skip
    saved = {name: getattr(fused_layers, name) for name in _FUSED_LAUNCHERS}
    saved_write, saved_bgmv = paged_attention.write_kv, triton_kernels.bgmv
    cpu = torch.device("cpu")
    try:
        if fused:
            fused_layers.install(engine.model)
            for name in _FUSED_LAUNCHERS:
                setattr(fused_layers, name, launches(name, lambda *a: 1, saved[name]))
            paged_attention.write_kv = launches("write_kv", lambda *a: 1, saved_write)
            kernel = paged_decode_kernel.paged_decode_attention
            paged_attention._kernels[cpu] = launches("paged_decode", decode_launches, kernel)
        if lora:
            assert engine.lora_state is not None
            engine.lora_state.backend = "triton"
            triton_kernels.bgmv = launches("bgmv", lambda *a: 2, saved_bgmv)
        params = SamplingParams(max_tokens=100, ignore_eos=True)
        admit = [GenerationRequest(f"r{i}", "The river", params) for i in range(rows)]
        engine.step(admit, [])
        for _ in range(3):
            engine.step([], [])
        assert engine.decode_graphs is not None
        with torch.inference_mode():  # a warm-up, as before a capture (allocates scratch)
            engine.decode_graphs._forward(rows, lora, 10, None)
        counts.clear()
        with torch.inference_mode(), mode:
            engine.decode_graphs._forward(rows, lora, 10, None)
    finally:
        for name, launcher in saved.items():
            setattr(fused_layers, name, launcher)
        paged_attention.write_kv, triton_kernels.bgmv = saved_write, saved_bgmv
        paged_attention._kernels.pop(cpu, None)
    return int(engine.model.config.num_hidden_layers), counts


_FUSED_LAUNCHERS = ("rms_norm", "add_rms_norm", "silu_mul", "rotary")


if __name__ == "__main__":
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    for fused, lora in [
        (False, False),
        *([(True, False), (False, True), (True, True)] * interpreted),
    ]:
        layers, counts = count_decode_forward(fused, lora=lora)
        name = f"{'fused' if fused else 'plain'}{', LoRA' if lora else ''}"
        print(f"{name}: {layers} layers, {sum(counts.values())} launches")
        print("  " + ", ".join(f"{n} {c}" for n, c in counts.most_common()))
