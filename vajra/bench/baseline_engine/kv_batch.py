"""The running rows of the baseline engine and their KV cache, padded so rows can join and leave.

Layout: a ``transformers.DynamicCache`` whose rows are right-aligned; row ``i`` holds its real
tokens in its last ``num_cached`` columns, everything before is padding. Rows leaving are
index-selected away and columns that became padding in every row are trimmed; rows joining are
left-padded to a common width and concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from vajra.bench.baseline_engine.text_stream import TextStream
from vajra.gpu.interface import GenerationRequest


@dataclass(eq=False)
class Row:
    """One request in the engine: its tokens, its text so far and what it computed."""

    request: GenerationRequest
    prompt_ids: list[int]
    text: TextStream
    generator: torch.Generator | None
    num_cached: int = 0  # this row's tokens in the KV cache
    completion_tokens: int = 0
    compute_ms: float = 0.0


@dataclass(eq=False)
class Batch:
    """Rows that decode together; see the module docstring for the cache layout."""

    seqs: list[Row]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns] int64: 1 where the cache holds a real token
    next_ids: torch.Tensor  # [rows] int64: each row's latest token, sampled but not yet cached

    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` and trim the leading columns that are padding in all of them."""
        start = self.mask.shape[1] - max(self.seqs[i].num_cached for i in rows)
        index = torch.tensor(rows, device=self.mask.device)
        for layer in _full_layers(self.cache):
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask = self.mask[index, start:]
        self.next_ids = self.next_ids[index]
        self.seqs = [self.seqs[i] for i in rows]

    def extend(self, other: Batch) -> None:
        """Append ``other``'s rows, left-padding both caches to a common width."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(_full_layers(self.cache), _full_layers(other.cache), strict=True):
            mine.keys = torch.cat(
                [_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)]
            )
            mine.values = torch.cat(
                [_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)]
            )
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.seqs += other.seqs


def _full_layers(cache: DynamicCache) -> list[Any]:
    """The cache's layers, each a plain ``DynamicLayer`` with ``keys``/``values`` tensors of
    shape [rows, kv_heads, columns, head_dim]; other layer kinds (sliding window, linear
    attention) cannot be re-padded like this."""
    layers = list(cache.layers)
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise TypeError(f"unsupported KV cache layer {type(layer).__name__}")
    return layers


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` on the left of ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    return F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [missing, 0])
