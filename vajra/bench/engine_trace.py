"""The engine benchmark's workloads: Azure LLM trace requests made into prompts of exact length.

Data flows left to right: the trace sample in ``vajra/bench/data/`` (see its README: source and
licence) -> :func:`trace_requests` (arrival time, prompt and output lengths, capped) ->
:class:`PromptMaker` (a prompt string of exactly that many tokens for the model's tokenizer) ->
:class:`BenchRequest` (what the driver admits).
"""

from __future__ import annotations

import csv
import dataclasses
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent / "data"
TRACE_FILES = {
    "code": DATA_DIR / "AzureLLMInferenceTrace_code_first320.csv",
    "conv": DATA_DIR / "AzureLLMInferenceTrace_conv_first320.csv",
}


@dataclass(frozen=True)
class TraceRow:
    """One request of the trace: seconds since its file's first row, and its token counts."""

    offset_s: float
    service: str  # "code" or "conv"
    context_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class BenchRequest:
    """One request as the driver admits it: ``arrival_s`` after the run starts."""

    request_id: str
    prompt: str
    prompt_tokens: int  # what the prompt encodes to, BOS included
    max_tokens: int
    arrival_s: float
    adapter_slot: int | None = None


def _parse_time(text: str) -> float:
    """``YYYY-MM-DD HH:MM:SS.fffffff`` (7 fraction digits, as in the 2023 trace) or with 6 and
    a zone (the 2024 trace), to POSIX seconds; the zone, if any, is ignored."""
    day, _, clock = text.strip().partition(" ")
    clock = clock.split("+")[0]
    whole, _, frac = clock.partition(".")
    stamp = datetime.fromisoformat(f"{day} {whole}").timestamp()
    return stamp + (float(f"0.{frac}") if frac else 0.0)


def read_trace(files: dict[str, Path] | None = None) -> list[TraceRow]:
    """Both services' rows merged by time since each file's own first row (so the two start
    together), in arrival order."""
    rows: list[TraceRow] = []
    for service, path in (files or TRACE_FILES).items():
        with path.open(newline="") as f:
            records = list(csv.DictReader(f))
        start = _parse_time(records[0]["TIMESTAMP"])
        rows += [
            TraceRow(
                offset_s=_parse_time(r["TIMESTAMP"]) - start,
                service=service,
                context_tokens=int(r["ContextTokens"]),
                generated_tokens=int(r["GeneratedTokens"]),
            )
            for r in records
        ]
    rows.sort(key=lambda r: (r.offset_s, r.service))
    return rows


@dataclass(frozen=True)
class TraceShape:
    """How trace rows become requests: lengths scaled then capped, arrivals sped up."""

    max_prompt_tokens: int
    max_output_tokens: int
    prompt_scale: float = 1.0
    rate_scale: float = 1.0

    def prompt_tokens(self, row: TraceRow) -> int:
        return max(2, min(self.max_prompt_tokens, round(row.context_tokens * self.prompt_scale)))

    def output_tokens(self, row: TraceRow) -> int:
        return max(1, min(self.max_output_tokens, row.generated_tokens))

    def describe(self) -> dict[str, Any]:
        return {
            "source": "Azure LLM inference trace 2023 (code + conversation), CC-BY 4.0; "
            "first 320 rows of each, merged by time since each file's start",
            "prompt_tokens": f"ContextTokens x {self.prompt_scale}, capped at "
            f"{self.max_prompt_tokens} (BOS included)",
            "output_tokens": f"GeneratedTokens capped at {self.max_output_tokens}",
            "arrivals": f"trace timestamps divided by {self.rate_scale}",
            "eos": "never ends a request early on the built model (its EOS logit is 0); every "
            "request runs to its output length",
        }


class PromptMaker:
    """Prompts of an exact token count for one tokenizer, distinct unless asked to share.

    Semantics: a prompt of ``n`` tokens is ``n - 1`` words, each a single token that starts with
    a space (`` river``), so that the tokenizer's BOS plus the words encode to exactly ``n``
    tokens; the words are drawn with the maker's seeded random stream.
    """

    def __init__(self, tokenizer: Any, *, seed: int = 0) -> None:
        self._tokenizer = tokenizer
        self._rng = random.Random(seed)
        self.words = _single_token_words(tokenizer)
        if len(self.words) < 16:
            raise ValueError("the tokenizer has too few single-token words for the benchmark")
        bos = self._tokenizer.encode("", add_special_tokens=True)
        self._specials = len(bos)  # tokens the tokenizer adds (1 for a Llama-style BOS)

    def text(self, tokens: int) -> str:
        """Words for ``tokens`` tokens of text (no BOS counted)."""
        return "".join(self._rng.choice(self.words) for _ in range(max(0, tokens)))

    def prompt(self, tokens: int, prefix: str = "") -> str:
        """A prompt that encodes to ``tokens`` tokens in all, ``prefix`` (words from
        :meth:`text`) first."""
        prefix_tokens = len(self._tokenizer.encode(prefix, add_special_tokens=False))
        return prefix + self.text(tokens - self._specials - prefix_tokens)

    def count(self, prompt: str) -> int:
        return len(self._tokenizer.encode(prompt, add_special_tokens=True))


def _single_token_words(tokenizer: Any) -> list[str]:
    words = []
    for token_id in range(int(tokenizer.vocab_size)):
        text = tokenizer.decode([token_id])
        if len(text) < 3 or text[0] != " " or not text[1:].isalpha():
            continue
        if tokenizer.encode(text, add_special_tokens=False) == [token_id]:
            words.append(text)
    return sorted(set(words))


def trace_requests(
    rows: list[TraceRow],
    count: int,
    shape: TraceShape,
    prompts: PromptMaker,
    *,
    prefix: str = "r",
    adapter_slots: list[int] | None = None,
    arrivals: bool = True,
) -> list[BenchRequest]:
    """The first ``count`` trace rows as requests (cycling through the rows if more are
    asked for than the sample holds, each lap later by the sample's length); request ``i``
    uses ``adapter_slots[i % len(adapter_slots)]`` when given; ``arrivals=False`` makes every
    request arrive at 0."""
    span = rows[-1].offset_s + 1.0
    out = []
    for i in range(count):
        row = rows[i % len(rows)]
        offset = row.offset_s + span * (i // len(rows))
        tokens = shape.prompt_tokens(row)
        out.append(
            BenchRequest(
                request_id=f"{prefix}{i}",
                prompt=prompts.prompt(tokens),
                prompt_tokens=tokens,
                max_tokens=shape.output_tokens(row),
                arrival_s=offset / shape.rate_scale if arrivals else 0.0,
                adapter_slot=adapter_slots[i % len(adapter_slots)] if adapter_slots else None,
            )
        )
    first = min(r.arrival_s for r in out)
    return [dataclasses.replace(r, arrival_s=r.arrival_s - first) for r in out]
