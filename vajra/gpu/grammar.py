"""Structured output: a request's grammar as a mask over its next token, through llguidance.

Data flows left to right: a request's :class:`~vajra.policies.decoding.StructuredOutput` ->
:meth:`Grammars.matcher` (compiled once per ``(kind, spec)``, then copied) -> one
:class:`Matcher` per request -> :meth:`Grammars.fill_bitmask` before each sampled token ->
:meth:`Matcher.accept` with the token the engine commits.

Semantics (the decoding contract is :mod:`vajra.policies.decoding`, step 2):

* ``json_object``: any JSON object; ``json_schema``: JSON valid against the schema
  (llguidance's JSON-schema support: a keyword it cannot enforce is refused, not ignored),
  both laid out as ``json.dumps`` does, on one line: ``{"key": [1, 2], "other": "x"}``;
  ``regex``: text that the regular expression matches whole; ``lark``: a grammar in
  llguidance's Lark dialect.
* The mask allows exactly the tokens that keep the text a prefix of some valid output. Once the
  text is complete, EOS is allowed too (with whatever may still extend it); once nothing can
  extend it, only EOS is allowed and :meth:`Matcher.accept` reports the grammar terminated, so
  the engine ends the request at once (finish_reason "stop") rather than sampling EOS.
* ``max_tokens`` cuts a structured output short like any other: finish_reason "length", and
  the text may be incomplete JSON. OpenAI does the same; the client must check.
* A matcher that fails while decoding (a limit below hit mid-way) is in error for good
  (:attr:`Matcher.error`); the sampler then masks every token of that row, which gives the row
  ``BAD_ROW`` and the engine ends it with an error.

Bounds on what a hostile grammar can cost, all set through :class:`GrammarLimits`: the spec's
size is capped by the request rules (``STRUCTURED_SPEC_MAX_CHARS``, ``SCHEMA_MAX_DEPTH``); the
compiled grammar's size (``max_grammar_size``), the fuel to build its lexer (about 20 ms) and the
lexer's states (its memory) are capped; each token's mask has a lexer fuel (about 15 ms) and an
Earley-item budget. A grammar over a limit is refused as an ``InvalidRequest`` when llguidance
can tell at compile time; llguidance builds its lexer lazily, so some only fail while decoding,
which ends that request alone with an error (above). Compiling runs in the caller's thread
(llguidance releases the GIL meanwhile); compiled grammars are kept in a small LRU keyed by
``(kind, spec)``, so a repeated schema costs a copy (microseconds).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import torch
from llguidance.torch import fill_next_token_bitmask_par

from vajra.errors import InvalidRequest
from vajra.policies.decoding import StructuredOutput

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

#: JSON schema of ``json_object``: any object.
_ANY_OBJECT = '{"type": "object"}'
#: JSON's layout: ``json.dumps``'s, on one line. Free whitespace between tokens lets a model
#: loop on newlines and tabs until ``max_tokens``; a schema may still choose otherwise through
#: llguidance's ``x-guidance`` key.
_JSON_LAYOUT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


@dataclass(frozen=True, slots=True)
class GrammarLimits:
    """What compiling and running one grammar may cost (llguidance's ``LLParserLimits``)."""

    cache_size: int = 64  # compiled grammars kept, least recently used dropped first
    max_grammar_size: int = 200_000  # symbols in the compiled grammar's productions
    initial_lexer_fuel: int = 1_000_000  # building the lexer: about 20 ms
    max_lexer_states: int = 50_000  # the lexer's memory: about 1-2 kB a state
    step_lexer_fuel: int = 200_000  # one token's mask: about 15 ms of lexing
    step_max_items: int = 50_000  # one token's mask: Earley items, about 2.5 ms
    max_items_in_row: int = 2_000  # branching of one production row
    threads: int | None = None  # mask threads; None: llguidance's default (most CPUs)

    def parser_limits(self) -> llguidance.LLParserLimits:
        return llguidance.LLParserLimits(
            max_items_in_row=self.max_items_in_row,
            initial_lexer_fuel=self.initial_lexer_fuel,
            step_lexer_fuel=self.step_lexer_fuel,
            step_max_items=self.step_max_items,
            max_lexer_states=self.max_lexer_states,
            max_grammar_size=self.max_grammar_size,
            verbose_errors=False,  # errors name the grammar's fault, not the parser's state
        )


class Matcher:
    """One request's position in its grammar."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by the token the engine committed; True once the request must end: the
        grammar admits nothing more (only EOS), or the matcher failed (see :attr:`error`)."""
        if not self._matcher.consume_token(token_id):
            return True
        return bool(self._matcher.is_stopped())

    @property
    def terminated(self) -> bool:
        """Nothing but EOS may follow (also true in error)."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a limit hit, a forbidden token forced on it); None if not."""
        if not self._matcher.is_error():
            return None
        return str(self._matcher.get_error()) or "structured output failed"

    @property
    def raw(self) -> llguidance.LLMatcher:
        return self._matcher


class Grammars:
    """Compiles structured outputs for one tokenizer and fills the batch's masks.

    ``vocab_size`` is the width of the model's logits (it may exceed the tokenizer's);
    ``eos_token_ids`` the tokens that end a request, the only ones allowed once a grammar is
    done. The tokenizer's llguidance form is built on first use (up to about a second for a
    large vocabulary) and kept. Not thread-safe: one engine thread uses it.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        limits: GrammarLimits | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = [int(t) for t in eos_token_ids]
        self.limits = limits or GrammarLimits()
        self._parser_limits = self.limits.parser_limits()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._compiled: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()

    @property
    def bitmask_width(self) -> int:
        """int32 words of one row's mask (32 tokens a word); covers at least ``vocab_size``."""
        return (max(self._vocab_size, self._llg_tokenizer().vocab_size) + 31) // 32

    def matcher(self, structured: StructuredOutput) -> Matcher:
        """A fresh matcher at the start of ``structured``'s grammar; raises
        :class:`~vajra.errors.InvalidRequest` (field ``response_format``) with llguidance's
        message when the grammar is refused."""
        key = (structured.kind, structured.spec)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compile(structured)
            self._compiled[key] = compiled
            while len(self._compiled) > self.limits.cache_size:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return Matcher(compiled.deep_copy())

    def fill_bitmask(self, matchers: Sequence[Matcher], bitmask: torch.Tensor) -> None:
        """Write each matcher's allowed next tokens into row ``i`` of ``bitmask``
        ([n, bitmask_width] int32 on the CPU, contiguous; bit ``t % 32`` of word ``t // 32`` set
        means token ``t`` is allowed), in parallel on llguidance's threads. A matcher in error
        gets a row of zeros: nothing allowed."""
        if not matchers:
            return
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=self.limits.threads)
        fill_next_token_bitmask_par(
            self._executor, [(m.raw, i) for i, m in enumerate(matchers)], bitmask
        )
        for i, m in enumerate(matchers):
            if m.raw.is_error():
                bitmask[i].zero_()

    def _compile(self, structured: StructuredOutput) -> llguidance.LLMatcher:
        try:
            if structured.kind == "json_object":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    _ANY_OBJECT, defaults=_JSON_LAYOUT
                )
            elif structured.kind == "json_schema":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    structured.spec, defaults=_JSON_LAYOUT
                )
            elif structured.kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(structured.spec)
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(structured.spec)
        except ValueError as exc:  # not JSON, or not a schema object
            raise _refused(str(exc)) from None
        matcher = llguidance.LLMatcher(
            self._llg_tokenizer(), grammar, log_level=0, limits=self._parser_limits
        )
        if matcher.is_error():
            raise _refused(str(matcher.get_error()))
        return matcher

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            try:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self._tokenizer,
                    n_vocab=max(self._vocab_size, _tokenizer_size(self._tokenizer)),
                    eos_token=self._eos or None,
                )
            except ValueError as exc:  # a tokenizer without a fast (Rust) backend
                raise InvalidRequest(
                    f"structured output is not available for this model's tokenizer: {exc}",
                    field="response_format",
                ) from None
        return self._ll_tokenizer


def _tokenizer_size(tokenizer: Any) -> int:
    try:
        return len(tokenizer)
    except TypeError:
        return 0


def _refused(message: str) -> InvalidRequest:
    text = message.strip() or "the grammar was refused"
    return InvalidRequest(f"structured output: {text}", field="response_format")
