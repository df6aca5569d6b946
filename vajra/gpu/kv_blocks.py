"""Which KV blocks are free, which a request holds, and which hold a reusable prefix.

The paged KV cache (:mod:`vajra.gpu.paged_attention`) is ``num_blocks`` fixed blocks of
``block_size`` token positions, allocated once. This module is its bookkeeping, pure Python
and device-free: a request holds a *block table* (a list of block ids, position ``p`` of the
request lives in block ``table[p // block_size]`` at offset ``p % block_size``); nothing here
ever copies KV.

Prefix cache. A block whose ``block_size`` positions are all computed may be *published*
under a key that chains the namespace (the base model alone, or one adapter version's
digest), the key of the block before it, and its own tokens. A later request whose prompt
starts with the same tokens under the same namespace reuses the published blocks instead of
computing them (reference-counted, read-only: a request only ever writes positions past its
shared prefix, into blocks it owns alone). A block nobody references but that is published
stays cached, in least-recently-released order, until an allocation needs it: then the
oldest is evicted (unpublished) and handed out. So a new adapter version, whose digest
differs, can never read blocks computed with another version, and base-model requests share
among themselves.

Complexity: allocation, release and lookup are O(blocks touched).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

#: A prefix key: the hash chain of a namespace and the tokens of every block up to this one.
BlockKey = int


def block_keys(
    namespace: str, tokens: Sequence[int], block_size: int, *, after: BlockKey | None = None
) -> list[BlockKey]:
    """The keys of the full blocks of ``tokens`` under ``namespace`` (the partial last block,
    if any, has none). ``after``: the key of the block just before ``tokens[0]``, to extend
    a chain already computed (none: ``tokens`` start the request)."""
    keys: list[BlockKey] = []
    parent = hash(("vajra-kv", namespace)) if after is None else after
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        keys.append(parent)
    return keys


@dataclass(slots=True)
class KvStats:
    """Counters since start (``prefix_*`` count blocks of admitted requests' prompts)."""

    prefix_queries: int = 0
    prefix_hits: int = 0
    evictions: int = 0
    preemptions: int = 0


class BlockManager:
    """Free list, reference counts and the prefix cache of one paged KV cache."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, BlockKey] = {}  # published blocks
        self._block_of: dict[BlockKey, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # published, unreferenced: LRU first
        self.stats = KvStats()

    # ------------------------------------------------------------------ accounting

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take now: free ones plus cached ones nobody uses."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        """Blocks some request references."""
        return self.num_blocks - self.num_available

    @property
    def num_cached(self) -> int:
        """Published blocks (referenced or idle)."""
        return len(self._key_of)

    def report(self) -> dict[str, float]:
        """Sizes and counters, flat (for metrics and benchmarks)."""
        stats = self.stats
        queries = stats.prefix_queries
        return {
            "block_size": self.block_size,
            "total_blocks": self.num_blocks,
            "used_blocks": self.num_used,
            "cached_blocks": self.num_cached,
            "prefix_queries": queries,
            "prefix_hits": stats.prefix_hits,
            "prefix_hit_rate": stats.prefix_hits / queries if queries else 0.0,
            "evictions": stats.evictions,
            "preemptions": stats.preemptions,
        }

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ allocate / release

    def allocate(self, count: int) -> list[int] | None:
        """``count`` fresh blocks owned by the caller (refcount 1), or None if they do not fit
        (nothing is taken then). Evicts idle cached blocks, oldest first, when the free list
        runs short."""
        if count > self.num_available:
            return None
        blocks: list[int] = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                del self._block_of[self._key_of.pop(block)]
                self.stats.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; a block left unreferenced becomes free, or idle
        (still cached) if it is published. Released last-first, so that a request's later
        blocks are evicted before its earlier ones (they are the less shareable)."""
        for block in reversed(blocks):
            refs = self._refs[block] - 1
            if refs < 0:
                raise ValueError(f"block {block} released more often than referenced")
            self._refs[block] = refs
            if refs == 0:
                if block in self._key_of:
                    self._idle[block] = None
                else:
                    self._free.append(block)

    # ------------------------------------------------------------------ prefix cache

    def match(self, keys: Sequence[BlockKey]) -> list[int]:
        """The cached blocks of the longest published prefix of ``keys``, each now referenced
        once more by the caller (release them like allocated ones)."""
        blocks: list[int] = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._idle[block]
            self._refs[block] += 1
            blocks.append(block)
        return blocks

    def publish(self, block: int, key: BlockKey) -> None:
        """Offer a fully computed block under ``key``. If another block already holds that key,
        this one stays private (two requests computed the same prefix at once)."""
        if key in self._block_of or block in self._key_of:
            return
        self._key_of[block] = key
        self._block_of[key] = block

    def is_cached(self, key: BlockKey) -> bool:
        return key in self._block_of
