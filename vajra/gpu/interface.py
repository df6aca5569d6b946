"""What the executor sees of an engine: the step interface and the adapter-residency interface.

Data flows left to right: GenerationRequest -> :meth:`Engine.step` -> StepOutput. Any engine
the executor runs implements :class:`Engine` (the torch engine, the null engine, and the
paged-KV engine that will replace the torch one); an engine that serves LoRA adapters also
offers :class:`AdapterResidency` as ``engine.adapters``, which the executor's adapter tiers
(:mod:`vajra.actors.adapter_tiers`) drive. Neither the executor nor the tiers look past these
two interfaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import torch

from vajra.errors import VajraError
from vajra.gpu.lora.packing import HostAdapter, LoraLayout
from vajra.gpu.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str
    params: SamplingParams
    adapter_slot: int | None = None  # a slot of the engine's ``adapters``; None: base model only


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log-probability and its most likely alternatives (OpenAI ``logprobs``).

    ``token`` is the token's own text (a piece of a multi-byte character shows as U+FFFD);
    ``logprob`` is None only for a prompt's first token, which nothing precedes; ``top``
    holds ``(token_id, token, logprob)`` of the most likely tokens at that position, most
    likely first (as many as the request's ``logprobs`` / ``prompt_logprobs`` asked for).
    """

    token_id: int
    token: str
    logprob: float | None
    top: tuple[tuple[int, str, float], ...] = ()


class StepOutput(msgspec.Struct, frozen=True):
    """One request's news from one engine step. A frozen msgspec struct rather than a
    dataclass: an engine makes one per running row per step, and a frozen dataclass's
    constructor costs about ten times as much (2 us against 0.2 us a row on the CPU), which on
    a GPU is host time between decode steps."""

    request_id: str
    text_delta: str  # new text since the last output for this request (may be "")
    token_ids: tuple[int, ...]  # new token ids since the last output
    finished: bool
    finish_reason: str | None  # "stop" (stop string or EOS), "length", "error", "abort"
    prompt_tokens: int
    completion_tokens: int
    compute_ms: float  # this request's share of model time so far
    error: VajraError | None = None
    # One entry per token of ``token_ids`` when the request asked for ``logprobs``.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Every prompt token's entry, on the request's first output, when it asked for
    # ``prompt_logprobs`` (None otherwise).
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None


class AdapterResidency(Protocol):
    """The engine's adapter slots in device memory; the adapter tiers decide what sits in them.

    Semantics: slots are ints ``0 .. num_slots - 1``, one per resident adapter; device memory
    is held per slot for exactly the module kinds the adapter targets, at its own rank per
    kind (pages, :mod:`vajra.gpu.lora.pool`). An adapter packed by
    :func:`~vajra.gpu.lora.pack_adapter` for :attr:`layout` in :attr:`dtype`, of rank at most
    :attr:`max_rank`, fits once a slot and enough memory are free, and computes exactly as
    PEFT would.

    * :meth:`can_load` says whether :meth:`load` would succeed now (it raises InvalidAdapter
      for an adapter that could never fit); :meth:`frees_room_for` whether freeing a given
      slot gives back something that adapter lacks (a slot, or memory of a kind it needs),
      so the caller evicts only adapters whose eviction helps.
    * :meth:`load` copies a packed adapter into a free slot and free memory and returns the
      slot; without room it raises :class:`~vajra.errors.OverloadedError` (ask
      :meth:`can_load` first). The copy may be asynchronous (a CUDA copy stream):
      :meth:`copy_event`, asked right after, is the event that completes once the adapter's
      host buffer is no longer read (None: the copy is done); the implementation keeps the
      buffer alive until then, and batches that read the slot wait for the copy themselves.
    * :meth:`free` gives a slot back; the caller guarantees that no batch admitted after it
      reads the slot. Batches already running finish on what they read.
    * :meth:`resident` is every loaded slot and the digest of the adapter in it.

    Threads: :meth:`load` and :meth:`copy_event` run in a worker thread while the caller holds
    the GPU limiter (so no engine step runs meanwhile); the rest is cheap bookkeeping on the
    caller's own thread. The implementation never chooses what to evict.
    """

    @property
    def layout(self) -> LoraLayout: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def max_rank(self) -> int: ...

    @property
    def num_slots(self) -> int: ...

    def can_load(self, adapter: HostAdapter) -> bool: ...

    def frees_room_for(self, slot: int, adapter: HostAdapter) -> bool: ...

    def load(self, adapter: HostAdapter) -> int: ...

    def copy_event(self, slot: int) -> Any: ...

    def free(self, slot: int) -> None: ...

    def resident(self) -> dict[int, str]: ...


class Engine(Protocol):
    model_name: str
    device: str
    max_batch_size: int
    #: True when ``step`` runs the model and so must run off the event loop, in a worker thread.
    blocking: bool
    #: The adapter slots; None when the engine serves the base model only.
    adapters: AdapterResidency | None

    def step(self, admit: Sequence[GenerationRequest], abort: Sequence[str]) -> list[StepOutput]:
        """Admit, abort, run one decode pass; an output for every request that moved or ended
        (an aborted request it held: one finished output with ``finish_reason="abort"``)."""
        ...

    def num_running(self) -> int: ...

    def num_waiting(self) -> int: ...

    def has_work(self) -> bool: ...
