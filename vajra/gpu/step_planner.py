"""What each engine step computes: KV-aware admission, chunked prefill and preemption.

Every request the engine holds is a :class:`Sequence`: its tokens (prompt, then what it
generated) and how many of them have their keys and values in the paged cache
(``num_computed``). A step gives each running sequence one *chunk*, the next ``n`` of its
uncomputed tokens: a decoding sequence's chunk is its one newest token; a sequence still
reading its prompt (or recomputing after a preemption) gets as many as the step's token
budget leaves. When a chunk reaches the sequence's last token, the step samples its next
token from the logits there. So decode tokens of running requests and prefill chunks of new
ones share one packed forward, and a long prompt is read over several steps instead of
stalling every stream.

Order within a step (:meth:`StepPlanner.plan`):

1. running sequences, oldest first: decoding ones (one token each), then prefilling ones
   (a chunk each, while the budget lasts). A sequence whose next position needs a block when
   none is available preempts the NEWEST running sequence (its blocks are released; it waits
   at the head of the queue and later recomputes its tokens, with its sampler state kept, so
   its output is what it would have been), repeatedly, until the block fits;
2. waiting sequences, in arrival order (preempted ones first, by their original arrival),
   while the budget and ``max_rows`` allow: each first reuses the longest cached prefix
   (:class:`~vajra.gpu.kv_blocks.BlockManager`), and is admitted only if the blocks for all
   its tokens fit now (KV-aware admission: otherwise it waits, and so do the ones behind
   it). A sequence whose next block is being computed by a running sequence right now (the
   same prompt twice, e.g. ``n`` > 1 or a shared system prompt arriving together) waits one
   step more and then reuses it instead of computing it again.

Nothing here touches a device; :mod:`vajra.gpu.engine` turns the plan into one forward.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from vajra.gpu.interface import GenerationRequest, TokenLogprob
from vajra.gpu.kv_blocks import BlockKey, BlockManager, block_keys

_arrivals = itertools.count()


@dataclass(eq=False, slots=True)
class Sequence:
    """One request inside the engine."""

    request: GenerationRequest
    prompt_len: int
    tokens: list[int]  # prompt, then the completion
    namespace: str  # the prefix cache's namespace: "" for the base model, else the adapter digest
    sampler: Any  # vajra.gpu.sampling.RowSampler
    text: Any  # vajra.gpu.text_stream.TextStream
    arrival: int = field(default_factory=lambda: next(_arrivals))
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    keys: list[BlockKey] = field(default_factory=list)  # prefix keys of full blocks, lazily
    num_published: int = 0
    completion_tokens: int = 0
    compute_ms: float = 0.0
    want_prompt_logprobs: bool = False  # still to collect (first pass over the prompt)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def remaining(self) -> int:
        """Tokens whose KV is not computed yet."""
        return len(self.tokens) - self.num_computed

    def keys_upto(self, num_blocks: int, block_size: int) -> list[BlockKey]:
        """Prefix keys of the first ``num_blocks`` full blocks of the tokens, the chain
        extended from the keys already computed (tokens are only ever appended)."""
        have = len(self.keys)
        if have < num_blocks:
            self.keys += block_keys(
                self.namespace,
                self.tokens[have * block_size : num_blocks * block_size],
                block_size,
                after=self.keys[-1] if have else None,
            )
        return self.keys[:num_blocks]


@dataclass(slots=True)
class StepPlan:
    """Chunks to compute: ``(sequence, number of tokens)``; decode chunks (one token of a
    sequence past its prompt's first pass) come first."""

    chunks: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class StepPlanner:
    """The engine's queues and the block bookkeeping behind them."""

    def __init__(self, blocks: BlockManager, *, max_rows: int, max_batch_tokens: int) -> None:
        if max_batch_tokens < max_rows:
            raise ValueError("max_batch_tokens must be at least max_rows (one token per row)")
        self.blocks = blocks
        self.max_rows = max_rows
        self.max_batch_tokens = max_batch_tokens
        self.running: list[Sequence] = []  # arrival order
        self.waiting: list[Sequence] = []  # arrival order

    # ------------------------------------------------------------------ queues

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def remove(self, seq: Sequence) -> None:
        """Forget ``seq`` (finished or aborted) and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []

    # ------------------------------------------------------------------ planning

    def plan(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_batch_tokens
        planned: set[int] = set()
        decoding: list[Sequence] = []
        prefilling: list[Sequence] = []
        for seq in self.running:  # one pass: this runs every step for every row
            remaining = seq.remaining
            if remaining == 1:
                decoding.append(seq)
            elif remaining > 1:
                prefilling.append(seq)
        for seq in decoding:
            if seq in plan.preempted:
                continue
            if self._reserve(seq, 1, plan, planned):
                plan.chunks.append((seq, 1))
                planned.add(id(seq))
                budget -= 1
        for seq in prefilling:
            if budget <= 0:
                break
            if seq in plan.preempted:
                continue
            n = min(seq.remaining, budget)
            if self._reserve(seq, n, plan, planned):
                plan.chunks.append((seq, n))
                planned.add(id(seq))
                budget -= n
        self._admit(plan, budget)
        return plan

    def _admit(self, plan: StepPlan, budget: int) -> None:
        if plan.preempted:
            return  # the cache is short: admit nothing new this step
        pending = self._pending_keys()
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_rows:
                return
            size = self.blocks.block_size
            if not seq.want_prompt_logprobs and not seq.blocks:
                reusable = (len(seq.tokens) - 1) // size  # leave a token to compute
                keys = seq.keys_upto(reusable, size)
                seq.blocks = self.blocks.match(keys)
                seq.num_computed = len(seq.blocks) * size
                if len(seq.blocks) < len(keys) and keys[len(seq.blocks)] in pending:
                    self._unmatch(seq)  # computed by a running sequence right now: wait
                    continue
            need = self.blocks.blocks_for(len(seq.tokens) + 1) - len(seq.blocks)
            if need > self.blocks.num_available:
                self._unmatch(seq)
                return  # KV-aware admission: wait for blocks, keep arrival order
            n = min(seq.remaining, budget)
            matched = len(seq.blocks)
            if not self._grow(seq, seq.num_computed + n):
                self._unmatch(seq)
                return
            self.waiting.remove(seq)
            self.running.append(seq)
            if not seq.want_prompt_logprobs:
                stats = self.blocks.stats
                stats.prefix_queries += (len(seq.tokens) - 1) // size
                stats.prefix_hits += seq.num_computed // size
            plan.chunks.append((seq, n))
            budget -= n
            pending |= set(seq.keys_upto(len(seq.tokens) // size, size)[matched:])

    def _pending_keys(self) -> set[BlockKey]:
        """Keys of full blocks that running sequences are still computing."""
        size = self.blocks.block_size
        pending: set[BlockKey] = set()
        for seq in self.running:
            if seq.remaining > 1:
                full = len(seq.tokens) // size
                pending.update(seq.keys_upto(full, size)[seq.num_published :])
        return pending

    def _unmatch(self, seq: Sequence) -> None:
        self.blocks.release(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0

    def _reserve(self, seq: Sequence, n: int, plan: StepPlan, planned: set[int]) -> bool:
        """Blocks for ``seq``'s next ``n`` tokens, preempting the newest running sequences
        not yet planned if needed; False if ``seq`` itself had to go."""
        while not self._grow(seq, seq.num_computed + n):
            victims = [s for s in self.running if id(s) not in planned and s not in plan.preempted]
            victim = max(victims, key=lambda s: s.arrival)
            self._preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def _grow(self, seq: Sequence, num_positions: int) -> bool:
        need = self.blocks.blocks_for(num_positions) - len(seq.blocks)
        if need <= 0:
            return True
        fresh = self.blocks.allocate(need)
        if fresh is None:
            return False
        seq.blocks += fresh
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_published = [], 0, 0
        self.blocks.stats.preemptions += 1
        plan.preempted.append(seq)
        at = next((i for i, w in enumerate(self.waiting) if w.arrival > seq.arrival), None)
        self.waiting.insert(len(self.waiting) if at is None else at, seq)

    # ------------------------------------------------------------------ after the forward

    def computed(self, seq: Sequence, n: int) -> None:
        """``seq``'s chunk of ``n`` tokens is in the cache: publish the blocks it filled."""
        seq.num_computed += n
        size = self.blocks.block_size
        full = seq.num_computed // size
        if full > seq.num_published:
            keys = seq.keys_upto(full, size)
            for i in range(seq.num_published, full):
                self.blocks.publish(seq.blocks[i], keys[i])
            seq.num_published = full


def chunk_positions(seq: Sequence, n: int, block_size: int) -> tuple[range, list[int]]:
    """The positions of ``seq``'s next ``n`` tokens and each one's cache slot."""
    start = seq.num_computed
    positions = range(start, start + n)
    blocks = seq.blocks
    slots = [blocks[p // block_size] * block_size + p % block_size for p in positions]
    return positions, slots


def is_decode(seq: Sequence, n: int) -> bool:
    """A one-token chunk with context before it: attends through the batched decode path."""
    return n == 1 and seq.num_computed > 0
