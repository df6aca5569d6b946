"""One host pass over a sampling step's rows: what each row needs, as flat lists to upload.

:class:`SamplingPlan` is the host half of :meth:`vajra.gpu.sampling.Sampler.sample`: it reads
each :class:`~vajra.gpu.sampling.RowSampler` once, draws the sampling rows' uniforms from their
own streams, and lays every number the device needs into two lists (int64 and float64) that go
over in one copy each; ``at[name]`` is the slice of each named segment. Row lists hold the
batch's row indices, except ``k_rows`` and ``p_rows``, which index the sampling rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from vajra.gpu.grammar import Matcher

if TYPE_CHECKING:
    from vajra.gpu.sampling import RowSampler

#: Temperatures below this act as it (the scaled logits stay finite).
MIN_TEMPERATURE = 1e-5


class SamplingPlan:
    """One host pass over a step's rows: which rows need which step, and the numbers to upload
    (two flat lists; ``at[name]`` is each named segment's slice)."""

    def __init__(self, rows: Sequence[RowSampler], vocab: int, eos: list[int]) -> None:
        self.ints: list[int] = []
        self.floats: list[float] = []
        self.at: dict[str, slice] = {}
        sampling_rows: list[int] = []
        top_k: list[int] = []
        temperature: list[float] = []
        uniform: list[float] = []
        top_p: list[float] = []
        self.k_rows: list[int] = []  # sampling rows with top_k > 0
        self.p_rows: list[int] = []  # sampling rows with top_p < 1 and no top_k
        self.k_max = 0
        self.prompt_ids: list[torch.Tensor] = []  # of the rows with a repetition penalty
        repeated: list[int] = []
        repetition: list[float] = []
        prompt_lengths: list[int] = []
        repeat_rows: list[int] = []  # their completion tokens
        repeat_tokens: list[int] = []
        repeat_penalty: list[float] = []
        self.count_rows: list[int] = []  # completion tokens of rows with presence / frequency
        count_tokens: list[int] = []
        counts: list[float] = []
        presence: list[float] = []
        frequency: list[float] = []
        self.logprob_rows: list[int] = []
        self.logprob_ks: list[int] = []
        self.banned_rows: list[int] = []
        banned_tokens: list[int] = []
        self.grammar_rows: list[int] = []
        self.matchers: list[Matcher] = []
        for i, row in enumerate(rows):
            p = row.params
            if row.rng is not None:
                local = len(sampling_rows)
                sampling_rows.append(i)
                temperature.append(max(p.temperature, MIN_TEMPERATURE))
                uniform.append(row.rng.random())
                k = min(p.top_k, vocab)
                top_k.append(k)
                top_p.append(p.top_p)
                if k > 0:
                    self.k_rows.append(local)
                    self.k_max = max(self.k_max, k)
                elif p.top_p < 1.0:
                    self.p_rows.append(local)
            if row.prompt_ids is not None:
                self.prompt_ids.append(row.prompt_ids)
                repeated.append(i)
                repetition.append(p.repetition_penalty)
                prompt_lengths.append(row.prompt_ids.shape[0])
                if row.counts:
                    repeat_rows += [i] * len(row.counts)
                    repeat_tokens += row.counts.keys()
                    repeat_penalty += [p.repetition_penalty] * len(row.counts)
            if row.counts and (p.presence_penalty or p.frequency_penalty):
                self.count_rows += [i] * len(row.counts)
                count_tokens += row.counts.keys()
                counts += row.counts.values()
                presence += [p.presence_penalty] * len(row.counts)
                frequency += [p.frequency_penalty] * len(row.counts)
            if p.logprobs is not None:
                self.logprob_rows.append(i)
                self.logprob_ks.append(min(p.logprobs, vocab))
            early = row.num_tokens < p.min_tokens
            banned = [*(eos if p.ignore_eos or early else ()), *(p.stop_token_ids if early else ())]
            for token in banned:
                if token < vocab:
                    self.banned_rows.append(i)
                    banned_tokens.append(token)
            if row.matcher is not None:
                self.grammar_rows.append(i)
                self.matchers.append(row.matcher)
        self.sampling_rows = sampling_rows
        self.logprob_k = max(self.logprob_ks, default=0)
        self.prompt_total = sum(prompt_lengths)
        self._ints(
            sampling_rows=sampling_rows,
            top_k=top_k,
            k_rows=self.k_rows,
            p_rows=self.p_rows,
            repeated=repeated,
            prompt_lengths=prompt_lengths,
            repeat_rows=repeat_rows,
            repeat_tokens=repeat_tokens,
            count_rows=self.count_rows,
            count_tokens=count_tokens,
            logprob_rows=self.logprob_rows,
            banned_rows=self.banned_rows,
            banned_tokens=banned_tokens,
            grammar_rows=self.grammar_rows,
        )
        self._floats(
            temperature=temperature,
            uniform=uniform,
            top_p=top_p,
            repetition=repetition,
            repeat_penalty=repeat_penalty,
            counts=[*counts, *presence, *frequency],
        )

    def _ints(self, **segments: list[int]) -> None:
        for name, values in segments.items():
            self.at[name] = slice(len(self.ints), len(self.ints) + len(values))
            self.ints += values

    def _floats(self, **segments: list[float]) -> None:
        for name, values in segments.items():
            self.at[name] = slice(len(self.floats), len(self.floats) + len(values))
            self.floats += values
