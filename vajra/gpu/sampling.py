"""Picking each row's next token: one request's decoding state, and the batched sampler.

The semantics are those of :mod:`vajra.policies.decoding` (its module docstring is the one
definition; this module implements it for a batch). The engine builds one :class:`Sampler`,
asks it for a :class:`RowSampler` per request (:meth:`Sampler.new_row`) and keeps that across a
preemption. Each step, after its one packed forward::

    result = sampler.sample(logits, rows)      # [B, V] -> tokens on the device, no sync
    host = result.to_host()                    # THE device-to-host copy of the step
    for row, token in zip(rows, host.tokens):  # BAD_ROW: end that row with an error
        done = row.accept(token)               # True: its grammar has terminated

Per step on the host: one pass over the rows gathering their parameters into two lists (ints,
floats), copied to the device in two non-blocking copies from pinned memory (their length: the
rows, plus the distinct completion tokens of penalised rows, plus masked EOS / stop ids); one
draw per sampling row from its own random stream; llguidance filling the grammar rows' bitmask
on its threads (on a GPU the forward may still be running meanwhile), copied over once. A row
with a repetition penalty keeps its prompt's distinct ids on the device from :meth:`new_row`
on. On the device, vectorised over rows:
penalties (only rows that use them), the EOS / stop-token masks, the grammar bitmask (one op),
argmax, and for sampling rows temperature, top-k (``topk``, no full sort), top-p (a sort only
for rows with ``top_p < 1`` and no ``top_k``; within the top-k otherwise) and the draw. Nothing
synchronises the device until :meth:`SampleResult.to_host`.

Randomness: a sampling row owns a host random stream (``random.Random``, seeded by ``seed``,
else from the OS) and uses exactly one number of it per :meth:`Sampler.sample` call, inverting
the CDF of its final distribution (in vocabulary order) there. So a seeded request draws the
same tokens whatever shares its batch and after a preemption, on any device up to float
rounding. Tokens tied with the last one kept by ``top_k`` / ``top_p`` are kept too;
temperatures below ``MIN_TEMPERATURE`` (:mod:`vajra.gpu.sampling_plan`) act as it.

A row whose logits cannot be sampled (a NaN or +inf anywhere, every logit -inf, or nothing
left after the masks, e.g. a failed grammar) gets :data:`BAD_ROW`; the other rows are
unaffected and sampling never raises because of one row.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vajra.gpu.grammar import GrammarLimits, Grammars, Matcher
from vajra.gpu.logits_processing import (
    NEG_INF,
    apply_count_penalties,
    apply_repetition_penalty,
    inverse_cdf_draw,
    truncation_threshold,
    unpack_bitmask,
)
from vajra.gpu.logprobs import prompt_logprobs, token_logprob
from vajra.gpu.sampling_plan import SamplingPlan
from vajra.gpu.text_stream import TokenTexts
from vajra.policies.decoding import SamplingParams

if TYPE_CHECKING:
    from vajra.gpu.interface import TokenLogprob

__all__ = [
    "BAD_ROW",
    "HostSample",
    "RowSampler",
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "prompt_logprobs",
]

#: The token of a row that cannot be sampled.
BAD_ROW = -1


class RowSampler:
    """One request's decoding state: its parameters, random stream, penalty counts, grammar
    position and number of completion tokens. Built by :meth:`Sampler.new_row`."""

    __slots__ = ("counts", "matcher", "num_tokens", "params", "prompt_ids", "rng")

    def __init__(
        self,
        params: SamplingParams,
        rng: random.Random | None,
        prompt_ids: torch.Tensor | None,
        matcher: Matcher | None,
    ) -> None:
        self.params = params
        self.rng = rng  # None: greedy
        self.prompt_ids = prompt_ids  # [distinct prompt tokens] int64 on the device; rep. penalty
        self.matcher = matcher
        self.num_tokens = 0  # completion tokens accepted
        self.counts: dict[int, int] | None = {} if params.penalised else None

    def accept(self, token_id: int) -> bool:
        """Record the token the engine committed; True if the grammar has now terminated (or
        failed: see :attr:`error`), so the request must stop."""
        self.num_tokens += 1
        if self.counts is not None:
            self.counts[token_id] = self.counts.get(token_id, 0) + 1
        return self.matcher is not None and self.matcher.accept(token_id)

    @property
    def error(self) -> str | None:
        """Why the request's grammar failed while decoding (None: it has not)."""
        return None if self.matcher is None else self.matcher.error


@dataclass(frozen=True, slots=True)
class HostSample:
    """A step's sampled tokens on the host: ``tokens[i]`` for row ``i`` (``BAD_ROW``: none),
    ``logprobs[i]`` its entry when the row asked for logprobs (None otherwise or if bad)."""

    tokens: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass(slots=True)
class SampleResult:
    """What :meth:`Sampler.sample` computed, still on the device."""

    tokens: torch.Tensor  # [B] int64 on the device; BAD_ROW (-1) is no token id: never embed it
    _packed: torch.Tensor  # [B + L * (1 + 2K)] float64: tokens, then the logprob rows' data
    _logprob_rows: list[int]  # the L rows that asked for logprobs
    _logprob_ks: list[int]  # how many alternatives each asked for (K: the largest)
    _token_text: Callable[[int], str]
    _host: HostSample | None = field(default=None)

    def to_host(self) -> HostSample:
        """The step's one device-to-host copy (waits for the device); cached."""
        if self._host is None:
            values = self._packed.cpu().tolist()
            n = self.tokens.shape[0]
            tokens = [int(v) for v in values[:n]]
            logprobs: list[TokenLogprob | None] = [None] * n
            rows, k_max = self._logprob_rows, max(self._logprob_ks, default=0)
            chosen = values[n : n + len(rows)]
            top_ids = values[n + len(rows) : n + len(rows) * (1 + k_max)]
            top_lps = values[n + len(rows) * (1 + k_max) :]
            for j, (row, k) in enumerate(zip(rows, self._logprob_ks, strict=True)):
                if tokens[row] == BAD_ROW:
                    continue
                top = slice(j * k_max, j * k_max + k)
                logprobs[row] = token_logprob(
                    tokens[row], chosen[j], top_ids[top], top_lps[top], self._token_text
                )
            self._host = HostSample(tokens, logprobs)
        return self._host


class Sampler:
    """Samples one token per row of a batch's logits (see the module docstring).

    ``vocab_size`` is the logits' width; ``eos_token_ids`` end a request (masked by
    ``ignore_eos`` and before ``min_tokens``, and all a finished grammar allows); ``tokenizer``
    gives token texts and grammars; ``max_rows`` bounds a batch. One engine thread uses it.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        device: torch.device | str,
        eos_token_ids: Sequence[int],
        tokenizer: Any,
        max_rows: int,
        grammar_limits: GrammarLimits | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.max_rows = max_rows
        self._eos = sorted({int(t) for t in eos_token_ids if 0 <= int(t) < vocab_size})
        self._pin = self.device.type == "cuda"
        self.token_text = TokenTexts(tokenizer)
        self.grammars = Grammars(tokenizer, vocab_size, self._eos, grammar_limits)
        self._neg_inf = torch.tensor(NEG_INF, device=self.device)

    def new_row(self, params: SamplingParams, prompt_ids: Sequence[int]) -> RowSampler:
        """A request's decoding state. Raises :class:`~vajra.errors.InvalidRequest`
        (field ``response_format``) when its grammar is refused."""
        matcher = None if params.structured is None else self.grammars.matcher(params.structured)
        rng = None if params.greedy else random.Random(params.seed)  # None: seeded by the OS
        distinct = None
        if params.repetition_penalty != 1.0:
            ids = sorted({int(t) for t in prompt_ids if 0 <= int(t) < self.vocab_size})
            distinct = self._upload(ids, torch.long)
        return RowSampler(params, rng, distinct, matcher)

    def prompt_logprobs(
        self, logits: torch.Tensor, prompt_ids: Sequence[int], k: int, *, start: int = 0
    ) -> tuple[TokenLogprob, ...]:
        """:func:`~vajra.gpu.logprobs.prompt_logprobs` with this sampler's token texts."""
        return prompt_logprobs(logits, prompt_ids, k, self.token_text, start=start)

    def sample(self, logits: torch.Tensor, rows: Sequence[RowSampler]) -> SampleResult:
        """One token per row of ``logits`` ([B, V], any float dtype, on the sampler's device)
        for ``rows[i]``; each sampling row uses one draw of its stream. No device sync."""
        n, vocab = logits.shape
        if n != len(rows) or vocab != self.vocab_size or n > self.max_rows:
            raise ValueError(f"logits {tuple(logits.shape)} for {len(rows)} rows of {vocab=}")
        plan = SamplingPlan(rows, vocab, self._eos)  # the host's work first, then the device's
        grammar_bitmask = self._grammar_bitmask(plan.matchers) if plan.matchers else None
        ints, floats = self._upload(plan.ints, torch.long), self._upload(plan.floats, torch.float64)
        edits = plan.prompt_ids or plan.count_rows or plan.banned_rows or plan.grammar_rows
        x = logits.to(torch.float32, copy=bool(edits))  # never write into the caller's logits
        bad = ~torch.isfinite(x.amax(dim=-1))  # a NaN or +inf anywhere, or all -inf

        if plan.prompt_ids:
            apply_repetition_penalty(x, *self._repetition_pairs(plan, ints, floats))
        if plan.count_rows:
            apply_count_penalties(
                x,
                ints[plan.at["count_rows"]],
                ints[plan.at["count_tokens"]],
                *floats[plan.at["counts"]].float().view(3, -1),  # counts, presence, frequency
            )
        logprobs = None
        if plan.logprob_rows:  # after the penalties, before masks and temperature
            logprobs = torch.log_softmax(x[ints[plan.at["logprob_rows"]]], dim=-1)
        if plan.banned_rows:
            banned = (ints[plan.at["banned_rows"]], ints[plan.at["banned_tokens"]])
            x.index_put_(banned, self._neg_inf)
        if grammar_bitmask is not None:
            at = ints[plan.at["grammar_rows"]]
            x[at] = x[at].masked_fill(~unpack_bitmask(grammar_bitmask, vocab), NEG_INF)
        if plan.banned_rows or plan.grammar_rows:
            bad |= torch.isneginf(x.amax(dim=-1))  # nothing left

        tokens = x.argmax(dim=-1)
        if plan.sampling_rows:
            at = ints[plan.at["sampling_rows"]]
            scaled = x[at] / floats[plan.at["temperature"]].float()[:, None]
            if plan.k_rows or plan.p_rows:
                cut = truncation_threshold(
                    scaled,
                    ints[plan.at["top_k"]],
                    floats[plan.at["top_p"]].float(),
                    ints[plan.at["k_rows"]] if plan.k_rows else None,
                    plan.k_max,
                    ints[plan.at["p_rows"]] if plan.p_rows else None,
                )
                scaled = scaled.masked_fill(scaled < cut[:, None], NEG_INF)
            tokens[at] = inverse_cdf_draw(scaled, floats[plan.at["uniform"]])
        tokens = tokens.masked_fill(bad, BAD_ROW)

        packed = [tokens.double()]
        if logprobs is not None:
            chosen = tokens[ints[plan.at["logprob_rows"]]].clamp(min=0)
            packed.append(logprobs.gather(1, chosen[:, None]).squeeze(1).double())
            if plan.logprob_k:
                top = logprobs.topk(plan.logprob_k, dim=-1)
                packed += [top.indices.double().flatten(), top.values.double().flatten()]
        return SampleResult(
            tokens,
            torch.cat(packed) if len(packed) > 1 else packed[0],
            plan.logprob_rows,
            plan.logprob_ks,
            self.token_text,
        )

    def _repetition_pairs(
        self, plan: SamplingPlan, ints: torch.Tensor, floats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, token, penalty) for every prompt token (kept on the device by each row) and
        completion token of the rows with a repetition penalty."""
        at = plan.at
        lengths = ints[at["prompt_lengths"]]
        total = plan.prompt_total  # known on the host: no sync to size the result
        prompt_rows = ints[at["repeated"]].repeat_interleave(lengths, output_size=total)
        penalty = floats[at["repetition"]].float()
        prompt_penalty = penalty.repeat_interleave(lengths, output_size=total)
        return (
            torch.cat([prompt_rows, ints[at["repeat_rows"]]]),
            torch.cat([*plan.prompt_ids, ints[at["repeat_tokens"]]]),
            torch.cat([prompt_penalty, floats[at["repeat_penalty"]].float()]),
        )

    def _grammar_bitmask(self, matchers: list[Matcher]) -> torch.Tensor:
        width = self.grammars.bitmask_width
        bitmask = torch.empty((len(matchers), width), dtype=torch.int32, pin_memory=self._pin)
        self.grammars.fill_bitmask(matchers, bitmask)
        return bitmask.to(self.device, non_blocking=True)

    def _upload(self, values: list[int] | list[float], dtype: torch.dtype) -> torch.Tensor:
        """Host numbers to the device: one non-blocking copy from pinned memory (the caching
        host allocator keeps the buffer until the copy is done); none for no numbers (a batch
        of plain greedy rows has none)."""
        if not values:
            return torch.empty(0, dtype=dtype, device=self.device)
        host = torch.tensor(values, dtype=dtype, pin_memory=self._pin)
        return host.to(self.device, non_blocking=True)
