"""Incremental detokenization with stop strings: the text a request may release so far.

A copy of ``vajra.gpu.text_stream`` before the paged-KV rewrite, for the baseline engine.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """Incremental detokenization and stop strings for one request.

    Text is released only once it is final: never half a UTF-8 character (a trailing U+FFFD
    waits for the next token) and never the start of a possible stop string (the last
    ``len(longest stop) - 1`` characters wait until the request finishes). A few prompt tokens
    are decoded along with the completion so that tokenizers which drop a word's leading space
    at the start of a decode still produce the right spacing.
    """

    _PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._ids = prompt_ids[-self._PROMPT_CONTEXT :]
        self._prefix_offset = 0  # decode window start
        self._read_offset = len(self._ids)  # ids before this are already in `text`
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # the completion text so far, cut before a stop string once one is found
        self._released = 0
        self.stopped = False

    def push(self, token_id: int) -> bool:
        """Add one generated token; return True once a stop string has appeared."""
        self._ids.append(token_id)
        self._decode_new(final=False)
        return self.stopped

    def flush(self) -> bool:
        """Finish: add a held-back partial character too; return True if a stop string appeared."""
        self._decode_new(final=True)
        return self.stopped

    def release(self, finished: bool) -> str:
        """The text that became final since the last call (all of it once ``finished``)."""
        end = len(self.text) if finished else max(self._released, len(self.text) - self._hold)
        piece = self.text[self._released : end]
        self._released = end
        return piece

    def _decode_new(self, *, final: bool) -> None:
        if self.stopped:
            return
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        search_from = max(0, len(self.text) - self._hold)
        self.text += after[len(before) :]
        hits = [i for s in self._stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _decode(self, ids: list[int]) -> str:
        text: str = self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text
