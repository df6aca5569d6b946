"""A planned step turned into the forward's inputs: plain data copied into buffers made once.

Each step the engine packs its chunks (decode tokens first, then prefill chunks) into one
token sequence. Everything the forward needs to know about that packing is integers: token
ids, positions, each token's cache slot, the decode requests' block tables and lengths, the
prefill chunks' block tables, which positions' logits to compute and which of those to sample.
:meth:`StepBuffers.fill` writes them as Python lists into ONE preallocated host buffer
(pinned on CUDA) and moves that to the device in ONE copy into ONE preallocated device
buffer; the tensors the step uses are views of it. No tensor is allocated per step for this
data (on the CPU the host buffer is the device buffer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vajra.gpu.paged_attention import Chunk, StepLayout
from vajra.gpu.step_planner import Sequence, chunk_positions, is_decode


@dataclass(slots=True)
class PackedStep:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    keep: torch.Tensor  # [K]: tokens whose logits the model computes
    sample_rows: torch.Tensor  # [S]: rows of those logits to sample, one per sampled sequence
    layout: StepLayout
    sampled: list[tuple[Sequence, int]] = field(default_factory=list)
    # sequence -> (first row of its prompt logits, rows, first position of its chunk)
    prompt_rows: dict[Sequence, tuple[int, int, int]] = field(default_factory=dict)
    adapter_segments: list[tuple[int, int, int | None]] = field(default_factory=list)


class StepBuffers:
    """The host and device buffers of one engine, sized for its largest step."""

    def __init__(
        self, device: torch.device, *, max_tokens: int, max_rows: int, max_blocks: int
    ) -> None:
        # ids, positions, slots, keep (<= T each); sample rows, decode lens (<= rows);
        # decode and chunk block tables (<= rows * blocks each).
        size = 4 * max_tokens + 2 * max_rows + 2 * max_rows * max_blocks
        cuda = device.type == "cuda"
        self._host = torch.zeros(size, dtype=torch.int64, pin_memory=cuda)
        self._host_np: Any = self._host.numpy()
        self._device_buf = (
            torch.zeros(size, dtype=torch.int64, device=device) if cuda else self._host
        )
        self._cuda = cuda

    def fill(self, chunks: list[tuple[Sequence, int]], block_size: int) -> PackedStep:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        keep: list[int] = []
        sample_rows: list[int] = []
        sampled: list[tuple[Sequence, int]] = []
        prompt_rows: dict[Sequence, tuple[int, int, int]] = {}
        segments: list[tuple[int, int, int | None]] = []
        decode: list[Sequence] = []
        prefill: list[tuple[int, int, int, Sequence]] = []  # start, n, pos, seq
        for seq, n in chunks:
            start = len(ids)
            span, chunk_slots = chunk_positions(seq, n, block_size)
            ids += seq.tokens[span.start : span.stop]
            positions += span
            slots += chunk_slots
            slot = seq.request.adapter_slot
            if slot is not None:
                segments.append((start, n, slot))
            completes = seq.num_computed + n == len(seq.tokens)
            if seq.want_prompt_logprobs and span.start < seq.prompt_len:
                prompt_rows[seq] = (len(keep), n, span.start)
                keep += range(start, start + n)
                if completes:
                    sample_rows.append(len(keep) - 1)
            elif completes:
                sample_rows.append(len(keep))
                keep.append(start + n - 1)
            if completes:
                sampled.append((seq, n))
            if is_decode(seq, n):
                decode.append(seq)
            else:
                prefill.append((start, n, span.start, seq))

        groups = _decode_groups([s.num_computed + 1 for s in decode])
        width = max((len(s.blocks) for s in decode), default=0)
        decode_lens = [s.num_computed + 1 for s in decode]
        decode_tables: list[int] = []
        for s in decode:
            decode_tables += s.blocks + [0] * (width - len(s.blocks))
        chunk_tables: list[int] = []
        chunk_offsets: list[tuple[int, int]] = []
        for _, n, pos, seq in prefill:
            if pos > 0:
                need = -(-(pos + n) // block_size)
                chunk_offsets.append((len(chunk_tables), need))
                chunk_tables += seq.blocks[:need]
            else:
                chunk_offsets.append((0, 0))

        parts = [ids, positions, slots, keep, sample_rows, decode_lens, decode_tables, chunk_tables]
        offsets = []
        at = 0
        for part in parts:
            offsets.append(at)
            self._host_np[at : at + len(part)] = part
            at += len(part)
        if self._cuda:
            self._device_buf[:at].copy_(self._host[:at], non_blocking=True)
        buf = self._device_buf

        def view(i: int) -> torch.Tensor:
            return buf[offsets[i] : offsets[i] + len(parts[i])]

        t = len(ids)
        d = len(decode)
        tables = view(6).view(d, width) if d and width else None
        chunk_view = view(7)
        layout = StepLayout(
            num_tokens=t,
            slot_mapping=view(2),
            num_decode=d,
            decode_tables=tables,
            decode_lens=view(5) if d else None,
            decode_groups=groups,
            chunks=[
                Chunk(start, n, pos, chunk_view[o : o + c])
                for (start, n, pos, _), (o, c) in zip(prefill, chunk_offsets, strict=True)
            ],
        )
        return PackedStep(
            input_ids=view(0).view(1, t),
            position_ids=view(1).view(1, t),
            keep=view(3),
            sample_rows=view(4),
            layout=layout,
            sampled=sampled,
            prompt_rows=prompt_rows,
            adapter_segments=segments,
        )


#: Decode rows attend in groups whose lengths lie within this factor of the group's longest,
#: so padding to the longest costs at most that much; at most _MAX_GROUPS calls per layer.
_GROUP_SPREAD = 1.5
_MAX_GROUPS = 4


def _decode_groups(lengths: list[int]) -> list[tuple[int, int, int]]:
    """``(first row, end row, longest length)`` of consecutive decode rows; ``lengths`` are
    ascending (the engine orders decode rows so)."""
    groups: list[tuple[int, int, int]] = []
    end = len(lengths)
    while end > 0:
        longest = lengths[end - 1]
        start = end - 1
        if len(groups) == _MAX_GROUPS - 1:
            start = 0
        while start > 0 and lengths[start - 1] * _GROUP_SPREAD >= longest:
            start -= 1
        groups.append((start, end, longest))
        end = start
    return groups
