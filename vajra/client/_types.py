"""The values the client SDK hands back: results, stream chunks, usage, tenants, adapters.

Plain frozen dataclasses, built from the gateway's replies by :mod:`vajra.client._replies`;
log-probabilities are the wire's own :class:`~vajra.bus.messages.TokenLogprob` values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vajra.bus.messages import TokenLogprob


@dataclass(frozen=True, slots=True)
class Usage:
    """What one request cost. ``gpu_ms`` is measured by the executor."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    gpu_ms: float
    #: Time the request waited for an executor; a measurement, left out of equality.
    queue_ms: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant: what :meth:`~vajra.client.AsyncClient.whoami` answers."""

    tenant_id: str
    name: str


@dataclass(frozen=True, slots=True)
class TenantUsage:
    """A tenant's running usage totals, as the ledger recorded them."""

    tenant_id: str
    name: str
    requests: int
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new API key (shown only here) and the tenant it belongs to."""

    tenant_id: str
    name: str
    api_key: str


@dataclass(frozen=True, slots=True)
class ExecutorStatus:
    """One live executor's last heartbeat."""

    executor_id: str
    queue_depth: int
    running: int
    resident_adapters: int
    free_memory_bytes: int


@dataclass(frozen=True, slots=True)
class Choice:
    """One of the ``n`` completions of a call (``index`` 0..n-1), each its own request."""

    index: int
    request_id: str
    text: str
    tokens: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class InferenceResult:
    """The answer to :meth:`~vajra.client.Client.infer`.

    ``logprobs``: one entry per token of ``tokens`` when the call asked for ``logprobs``;
    ``prompt_logprobs``: one per prompt token when it asked for ``prompt_logprobs``.
    With ``n > 1`` the fields are choice 0's, except ``usage``, the total over the choices
    (the prompt counted once), and :attr:`choices` holds every choice.
    """

    request_id: str
    text: str
    tokens: list[int]
    finish_reason: str
    usage: Usage
    executor_id: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    #: Every choice of an ``n > 1`` call, by index; empty otherwise (see :attr:`choices`).
    fanout: tuple[Choice, ...] = ()

    @property
    def choices(self) -> tuple[Choice, ...]:
        """Every choice, by index: this result alone when the call asked for one."""
        if self.fanout:
            return self.fanout
        return (
            Choice(
                0,
                self.request_id,
                self.text,
                self.tokens,
                self.finish_reason,
                self.usage,
                self.logprobs,
            ),
        )


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """One piece of a streamed answer: the text and tokens produced since the previous chunk.

    The last chunk of a stream has ``finish_reason`` and ``usage`` set; its ``text`` holds
    whatever the final result carried beyond the earlier chunks (usually nothing). With
    ``n > 1`` the choices' chunks interleave: ``choice`` says whose it is (``index`` counts
    that choice's chunks), and each choice ends with a final chunk of its own.
    ``logprobs``: one entry per token of ``token_ids`` when asked for; ``prompt_logprobs``:
    on the first chunk that carries them, when asked for.
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    choice: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    executor_id: str = ""  # the final chunk's: the executor that served the request

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """One version of one of the caller's adapters."""

    name: str
    version: int
    digest: str  # sha256 hex over adapter_config.json then adapter_model.safetensors
    size_bytes: int
    rank: int
    active: bool = False
    lora_alpha: float = 0.0
    target_modules: tuple[str, ...] = ()
    created_ms: int = 0
    # Version metadata (docs/hot-swap.md).
    parent_version: int | None = None  # the version it continues from
    dataset_digest: str = ""
    hyperparams: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)  # e.g. final_loss
    source: str = "push"  # "push", "train" or "merge"
    staged: bool = False  # registered, never active yet

    @property
    def ref(self) -> str:
        """``NAME@VERSION``: what a request names to use exactly this version."""
        return f"{self.name}@{self.version}"
