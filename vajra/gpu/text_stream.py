"""Incremental detokenization with stop strings, and one token's own text for logprobs.

:class:`TextStream` turns a request's tokens into the text it may release so far, at a cost per
token that does not grow with the completion: with a fast (Rust) tokenizer each token is one
step of ``tokenizers.decoders.DecodeStream``, which decodes only a short window of recent
tokens; other tokenizers decode a bounded window the same way in Python. :class:`TokenTexts`
caches each token id's text (`` world``, with its leading space) for ``logprobs``.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

_REPLACEMENT = "\ufffd"
#: Ids decoded before a window, so that tokenizers which drop a word's leading space at the
#: start of a decode (SentencePiece) still space the window's first word right.
_CONTEXT = 5
#: Tokens a window may hold without ending a character before it is released anyway (a UTF-8
#: character is at most 4 bytes, so only tokens that decode to nothing or to invalid bytes get
#: here); this bounds the work per token whatever the model emits.
_MAX_PENDING = 16


class TextStream:
    """Incremental detokenization and stop strings for one request.

    ``text`` is the completion's text so far, cut before the first stop string once one has
    appeared. Text is released only once it is final: never half a UTF-8 character (a window
    whose text ends in U+FFFD waits for the next token, up to ``_MAX_PENDING`` tokens) and never
    the start of a possible stop string (the last ``len(longest stop) - 1`` characters wait
    until the request finishes). The released pieces joined equal ``tokenizer.decode`` of every
    completion token with special tokens skipped (the last prompt tokens are decoded first as
    context, so the first word's leading space is right).
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._decoder = _Decoder(tokenizer, prompt_ids)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._released: list[str] = []
        self._unreleased = ""  # always holds the text's last min(_hold, len(text)) characters
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self._released) + self._unreleased

    def push(self, token_id: int) -> bool:
        """Add one generated token; return True once a stop string has appeared."""
        if not self.stopped and (piece := self._decoder.step(token_id)):
            self._add(piece)
        return self.stopped

    def flush(self) -> bool:
        """Finish: add a held-back partial character too; return True if a stop string appeared."""
        if not self.stopped:
            self._add(self._decoder.flush())
        return self.stopped

    def release(self, finished: bool) -> str:
        """The text that became final since the last call (all of it once ``finished``)."""
        pending = self._unreleased
        if finished or not self._hold:
            piece, self._unreleased = pending, ""
        else:
            end = max(0, len(pending) - self._hold)
            piece, self._unreleased = pending[:end], pending[end:]
        if piece:
            self._released.append(piece)
        return piece

    def _add(self, piece: str | None) -> None:
        if not piece:
            return
        if not self._stop:
            self._unreleased += piece
            return
        search_from = max(0, len(self._unreleased) - self._hold)
        self._unreleased += piece
        hits = [i for s in self._stop if (i := self._unreleased.find(s, search_from)) >= 0]
        if hits:
            self._unreleased = self._unreleased[: min(hits)]
            self.stopped = True


class _Decoder:
    """Decodes tokens one at a time into final text: a window of ``_pending`` ids after a few
    ``_context`` ids already decoded (special tokens left out: they decode to nothing); each
    step decodes only that window."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._backend: Any = getattr(tokenizer, "backend_tokenizer", None)
        self._special = _special_ids(tokenizer, self._backend)
        self._context: list[int] = []
        for token in reversed(prompt_ids):
            if len(self._context) == _CONTEXT:
                break
            if token not in self._special:
                self._context.insert(0, token)
        self._pending: list[int] = []
        self._stream: DecodeStream | None = None
        self._base = ""  # the context's own text
        self._restart()

    def step(self, token_id: int) -> str | None:
        """The new final text after ``token_id``, or None while it ends mid-character."""
        self._pending.append(token_id)
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token_id)
            except Exception:  # tokenizers raises a bare Exception when a decode's prefix moved
                return self._release_pending()
        else:
            piece = self._window_step()
        if piece is not None:
            self._advance()
        elif len(self._pending) > _MAX_PENDING:
            return self._release_pending()
        return piece

    def flush(self) -> str:
        """Whatever the window holds, a trailing partial character as U+FFFD."""
        return self._release_pending() if self._pending else ""

    def _window_step(self) -> str | None:
        text = self._decode(self._context + self._pending)
        if len(text) <= len(self._base) or text.endswith(_REPLACEMENT):
            return None
        if text.startswith(self._base):
            return text[len(self._base) :]
        return self._decode(self._pending)

    def _release_pending(self) -> str:
        text = self._decode(self._context + self._pending)
        base = self._decode(self._context)
        piece = text[len(base) :] if text.startswith(base) else self._decode(self._pending)
        self._advance()
        self._restart()
        return piece

    def _advance(self) -> None:
        pending = self._pending
        if len(pending) == 1:  # the usual step: one token, one piece of text
            if pending[0] not in self._special:
                self._context.append(pending[0])
                if len(self._context) > _CONTEXT:
                    del self._context[0]
            pending.clear()
        else:
            fresh = [t for t in pending[-_CONTEXT:] if t not in self._special]
            self._context = (self._context + fresh)[-_CONTEXT:]
            self._pending = []
        if self._stream is None:
            self._base = self._decode(self._context)

    def _restart(self) -> None:
        self._base = self._decode(self._context)
        if self._base.endswith(_REPLACEMENT):  # DecodeStream would release it again
            self._context, self._base = [], ""
        if self._backend is not None:
            self._stream = DecodeStream(ids=self._context, skip_special_tokens=True)

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            text: str = self._backend.decode(ids, skip_special_tokens=True)
        else:
            text = self._tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        return text


def _special_ids(tokenizer: Any, backend: Any) -> frozenset[int]:
    """Ids that ``skip_special_tokens`` drops: the tokenizer's, and its backend's added ones."""
    ids = set(getattr(tokenizer, "all_special_ids", ()))
    if backend is not None:
        ids |= {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
    return frozenset(ids)


class TokenTexts:
    """Each token id's own text, cached: what OpenAI's ``logprobs`` show as ``token``.

    A token is decoded after a fixed plain token and that token's text is cut off, so a
    word-initial token keeps its leading space (" world") with SentencePiece tokenizers too;
    special tokens show as written ("</s>"); a piece of a multi-byte character shows as U+FFFD;
    an id the tokenizer does not know (the model's padded vocabulary) shows as "".
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}
        ids = tokenizer.encode("a", add_special_tokens=False)
        self._anchor: list[int] = list(ids[-1:])
        self._anchor_text = self._decode(self._anchor)

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._text_of(token_id)
        return text

    def _text_of(self, token_id: int) -> str:
        try:
            joined = self._decode([*self._anchor, token_id])
            if self._anchor and joined.startswith(self._anchor_text):
                return joined[len(self._anchor_text) :]
            return self._decode([token_id])
        except (ValueError, TypeError, IndexError, OverflowError, KeyError):
            return ""

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        return text
