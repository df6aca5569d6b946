"""Decode steps as CUDA graphs: one captured forward per batch-size bucket, replayed on new
inputs copied into static buffers.

Why: a decode step of a small model is hundreds of small kernels, each launched from Python.
On an H200 a Llama-3.2-1B-shaped step took 13-21 ms against a memory-bandwidth floor near
0.5 ms (docs/benchmarks.md, "First runs on an H200"): the time was the host's. A replayed
graph launches every kernel of the step at once.

What is static. A graph reads and writes fixed addresses, so everything a step varies lives in
buffers made once, into which each step copies its data (one host-to-device copy): token ids,
positions, each token's cache slot, the rows' context lengths and block tables (at their full
width), and, for the LoRA kernels, each row's pool slot. Every kernel of the step reads what
varies from those buffers on the device: the paged decode kernel
(:mod:`vajra.gpu.paged_decode_kernel`) walks each row's blocks up to its length, and the
BGMV kernels (:meth:`vajra.gpu.lora.LoraBatchState.set_static`) read each row's slot, ranks
and pages from the pool's tables, at the width of the pool's largest rank. A batch of ``D``
rows runs in the smallest bucket ``B >= D``; rows ``D .. B - 1`` are padding: token 0 at
position 0 whose key and value go to the KV cache's scratch block (never handed to a
request), reading only that block, with the pool's null slot (no LoRA delta); their logits are
dropped.

Which steps: those of decode tokens only (each request's next token, sampled), without prompt
logprobs, of at most the largest bucket's rows. Any other step (prefill chunks, recomputation
after a preemption, prompt logprobs) runs eagerly as before. With a LoRA pool there are two
graphs per bucket: base-only (no LoRA kernels) and with adapters.

When: ``mode="auto"`` captures at engine start on CUDA, when the step's kernels read only device
data (triton imports: the paged decode kernel and the LoRA Triton backend); elsewhere the
engine runs every step eagerly. ``mode="eager"`` runs the same static path without capturing:
on the CPU that is how the padding, the scratch block and the static buffers are tested; on
CUDA it is the control for a captured run. Sampling stays outside the graph: it reads the
graph's logits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from vajra.gpu import paged_decode_kernel
from vajra.gpu.lora import LoraBatchState
from vajra.gpu.lora.segments import Segment
from vajra.gpu.paged_attention import KvCache, StepLayout, running_step
from vajra.gpu.step_planner import Sequence, is_decode
from vajra.gpu.streams import fork_join

GraphMode = Literal["auto", "eager", "off"]

log = logging.getLogger(__name__)


def graph_buckets(max_rows: int) -> list[int]:
    """Batch sizes with a graph, ascending: 1, 2, 4, 8, 16, then steps of half the last power
    of two (24, 32, 48, 64, 96, 128, ...), and ``max_rows`` itself; a batch pads to at most
    1.5x its rows above 16."""
    sizes = [1, 2, 4, 8, 16]
    while sizes[-1] < max_rows:
        power = 1 << (sizes[-1].bit_length() - 1)
        sizes.append(sizes[-1] + power // 2 if sizes[-1] == power else 2 * power)
    return [s for s in sizes if s < max_rows] + [max_rows]


def can_capture(device: torch.device, lora: LoraBatchState | None) -> bool:
    """Whether a decode step on ``device`` reads only device data, so it can be captured: CUDA
    with the Triton decode kernel, and the LoRA state (if any) on its Triton backend."""
    if device.type != "cuda" or not paged_decode_kernel.available(device):
        return False
    return lora is None or lora.backend == "triton"


@dataclass
class GraphStats:
    captured: int = 0  # graphs captured
    capture_s: float = 0.0
    replays: int = 0  # steps run by replaying a graph
    eager: int = 0  # steps run on the static path without a graph (mode "eager")


class DecodeGraphs:
    """The static buffers, the captured graphs and the replay of decode-only steps (see the
    module docstring). Owned by one engine and used from its worker thread only."""

    def __init__(
        self,
        model: Any,
        kv: KvCache,
        *,
        scratch_block: int,
        lora: LoraBatchState | None,
        max_rows: int,
        max_blocks: int,
        capture: bool,
    ) -> None:
        device = kv.k[0].device
        self._model = model
        self._kv = kv
        self._lora = lora
        self._scratch = scratch_block
        self.buckets = graph_buckets(max_rows)
        self.stats = GraphStats()
        rows, width = self.buckets[-1], max_blocks
        self._width = width
        cuda = device.type == "cuda"
        # ids, positions, cache slots, lengths (a run of `rows` each), then the block tables.
        size = 4 * rows + rows * width
        self._host = torch.zeros(size, dtype=torch.int64, pin_memory=cuda)
        self._host_np: Any = self._host.numpy()
        self._host_tables: Any = self._host_np[4 * rows :].reshape(rows, width)
        # Each row's table as last written: the block list it came from and how much of it.
        # A row holding the same list again gets only the blocks appended since.
        self._written: list[tuple[list[int] | None, int]] = [(None, 0)] * rows
        self._buf = torch.zeros(size, dtype=torch.int64, device=device)
        self._keep = torch.arange(rows, dtype=torch.int64, device=device)
        self._lora_host = torch.zeros(rows, dtype=torch.int32, pin_memory=cuda)
        self._lora_host_np: Any = self._lora_host.numpy()
        self._lora_tokens = torch.arange(rows, dtype=torch.int32, device=device)
        self._lora_slots = torch.zeros(rows, dtype=torch.int32, device=device)
        self._rows = rows
        self._graphs: dict[tuple[int, bool], tuple[Any, torch.Tensor]] = {}
        if capture:
            self._capture_all()

    # ------------------------------------------------------------------ per step

    def fits(self, chunks: list[tuple[Sequence, int]]) -> bool:
        """Whether the step is one :meth:`run` takes: decode tokens only, each sampled, no
        prompt logprobs, at most the largest bucket's rows."""
        if not chunks or len(chunks) > self._rows:
            return False
        return all(
            is_decode(seq, n)
            and seq.num_computed + 1 == len(seq.tokens)
            and not seq.want_prompt_logprobs
            for seq, n in chunks
        )

    def run(self, chunks: list[tuple[Sequence, int]]) -> torch.Tensor:
        """The step's logits, one row per chunk in order (``[D, vocab]``, a view of the
        graph's output valid until the next step). Raises KeyError for a row whose adapter
        slot holds no adapter."""
        d = len(chunks)
        bucket = next(b for b in self.buckets if b >= d)
        slots = self._fill(chunks, bucket)
        used = sorted({s for s in slots if s is not None})
        with_lora = bool(used) and self._lora is not None
        if with_lora:
            assert self._lora is not None
            self._lora.ready(used)
        graph = self._graphs.get((bucket, with_lora))
        if graph is not None:
            graph[0].replay()
            self.stats.replays += 1
            return graph[1][:d]
        longest = max(seq.num_computed + 1 for seq, _ in chunks)
        segments: list[Segment] = [(i, 1, s) for i, s in enumerate(slots) if s is not None]
        logits = self._forward(bucket, with_lora, longest, segments)
        self.stats.eager += 1
        return logits[:d]

    @contextmanager
    def model_skipped(self) -> Iterator[None]:
        """Within it, decode steps do all but the model: the first runs the forward uncaptured
        and the next ones reuse its logits (a forward runs again only for a larger bucket).
        So a step's time within is its cost outside the model (planning, the buffers' fill,
        sampling, text): ``vajra bench engine`` (b)'s ``outside_model_ms``. Steps within
        count in no :attr:`stats`."""
        graphs, forward, eager = self._graphs, self._forward, self.stats.eager
        kept: list[torch.Tensor] = []

        def reuse(
            bucket: int, with_lora: bool, longest: int, segments: list[Segment] | None
        ) -> torch.Tensor:
            if not kept or kept[0].shape[0] < bucket:
                kept[:] = [forward(bucket, with_lora, longest, segments).clone()]
            return kept[0][:bucket]

        self._graphs = {}
        setattr(self, "_forward", reuse)  # noqa: B010 (shadows the method, for this block)
        try:
            yield
        finally:
            del self._forward  # the method again
            self._graphs, self.stats.eager = graphs, eager

    def _fill(self, chunks: list[tuple[Sequence, int]], bucket: int) -> list[int | None]:
        """Write the step's rows (and padding up to ``bucket``) into the static buffers: one
        copy to the device. Returns each row's adapter slot."""
        rows, size = self._rows, self._kv.block_size
        host, tables = self._host_np, self._host_tables
        null = self._lora.pool.null_slot if self._lora is not None else 0
        lora_host = self._lora_host_np
        d = len(chunks)
        ids: list[int] = []
        positions: list[int] = []
        cache_slots: list[int] = []
        slots: list[int | None] = []
        for i, (seq, _) in enumerate(chunks):  # Python lists, then one numpy write per run
            pos = seq.num_computed
            blocks = seq.blocks
            ids.append(seq.tokens[pos])
            positions.append(pos)
            cache_slots.append(blocks[pos // size] * size + pos % size)
            source, done = self._written[i]
            if source is not blocks or done > len(blocks):
                done = 0  # another sequence's list, or a new list of this one's
            if done < len(blocks):
                tables[i, done : len(blocks)] = blocks[done:]
            self._written[i] = (blocks, len(blocks))
            slots.append(seq.request.adapter_slot)
        host[:d] = ids
        host[rows : rows + d] = positions
        host[2 * rows : 2 * rows + d] = cache_slots
        host[3 * rows : 3 * rows + d] = positions
        host[3 * rows : 3 * rows + d] += 1  # lengths: one past each position
        lora_host[:d] = [null if slot is None else slot for slot in slots]
        pad = slice(d, bucket)
        host[pad] = 0
        host[rows + pad.start : rows + bucket] = 0
        host[2 * rows + pad.start : 2 * rows + bucket] = self._scratch * size
        host[3 * rows + pad.start : 3 * rows + bucket] = 1
        tables[pad, 0] = self._scratch
        self._written[pad] = [(None, 0)] * (bucket - len(chunks))
        lora_host[pad] = null
        self._buf.copy_(self._host, non_blocking=True)
        self._lora_slots.copy_(self._lora_host, non_blocking=True)
        return slots

    # ------------------------------------------------------------------ the forward

    def _forward(
        self,
        bucket: int,
        with_lora: bool,
        longest: int,
        segments: list[Segment] | None,
    ) -> torch.Tensor:
        """One forward of the first ``bucket`` static rows: what a graph captures. The LoRA
        rows are static (:meth:`LoraBatchState.set_static`) on the Triton backend, else
        ``segments`` planned on the host (the eager path of the torch backend)."""
        rows = self._rows
        buf = self._buf
        layout = StepLayout(
            num_tokens=bucket,
            slot_mapping=buf[2 * rows : 2 * rows + bucket],
            num_decode=bucket,
            decode_tables=buf[4 * rows : 4 * rows + bucket * self._width].view(bucket, -1),
            decode_lens=buf[3 * rows : 3 * rows + bucket],
            decode_groups=[(0, bucket, longest)],  # the torch path's only; kernels read lens
        )
        lora = self._lora if with_lora else None
        if lora is not None:
            if lora.backend == "triton" or segments is None:
                lora.set_static(self._lora_tokens[:bucket], self._lora_slots[:bucket])
            else:
                lora.set_segments(segments, bucket)
        try:
            with running_step(self._kv, layout):
                out = self._model(
                    input_ids=buf[:bucket].view(1, bucket),
                    position_ids=buf[rows : rows + bucket].view(1, bucket),
                    use_cache=False,
                    logits_to_keep=self._keep[:bucket],
                )
        finally:
            if lora is not None:
                lora.clear()
        logits: torch.Tensor = out.logits[0]
        return logits

    def _capture_all(self) -> None:
        """Capture every bucket's graphs, largest first, into one memory pool; the inputs are
        all padding while capturing (nothing but the scratch block is written)."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        variants = [False, True] if self._lora is not None else [False]
        side = torch.cuda.Stream(self._buf.device)  # type: ignore[no-untyped-call]
        with torch.inference_mode():
            self._fill([], self._rows)
            side.wait_stream(torch.cuda.current_stream(self._buf.device))
            for bucket in reversed(self.buckets):
                for with_lora in variants:
                    with torch.cuda.stream(side):  # warm-up: compiles kernels, picks algorithms
                        self._forward(bucket, with_lora, 1, None)
                    torch.cuda.current_stream(self._buf.device).wait_stream(side)
                    graph = torch.cuda.CUDAGraph()  # type: ignore[no-untyped-call]
                    with torch.cuda.graph(graph, pool=pool):
                        out = self._forward(bucket, with_lora, 1, None)
                    self._graphs[(bucket, with_lora)] = (graph, out)
        torch.cuda.synchronize(self._buf.device)
        self.stats.captured = len(self._graphs)
        self.stats.capture_s = time.perf_counter() - start
        log.info(
            "captured %d decode graphs (buckets %s) in %.2f s",
            len(self._graphs),
            self.buckets,
            self.stats.capture_s,
        )


def start_decode_graphs(
    mode: GraphMode,
    model: Any,
    kv: KvCache,
    *,
    scratch_block: int,
    lora: LoraBatchState | None,
    max_rows: int,
    max_blocks: int,
    stream: Any,
) -> tuple[DecodeGraphs | None, str | None]:
    """An engine's decode graphs for ``mode`` (None for "off", or where "auto" cannot
    capture), made on the engine's ``stream``, and why "auto" failed to capture if it did:
    the engine then serves every step eagerly rather than not at all."""
    capture = mode == "auto" and can_capture(kv.k[0].device, lora)
    if not (capture or mode == "eager"):
        return None, None
    try:
        with fork_join(stream):
            graphs = DecodeGraphs(
                model,
                kv,
                scratch_block=scratch_block,
                lora=lora,
                max_rows=max_rows,
                max_blocks=max_blocks,
                capture=capture,
            )
    except Exception as exc:
        if not capture:
            raise
        log.exception("capturing decode graphs failed; every step runs eagerly")
        return None, f"{type(exc).__name__}: {exc}"
    return graphs, None
