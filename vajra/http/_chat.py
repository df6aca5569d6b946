"""Chat messages to one prompt string, with the model's own chat template when it has one.

Only the tokenizer is loaded (``AutoTokenizer.from_pretrained`` on the configured model
directory), never the weights. A model without a tokenizer or without a chat template gets
a plain ``role: content`` transcript ending in ``assistant:``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("vajra.http")


class ChatTemplate:
    def __init__(self, tokenizer: Any | None = None) -> None:
        self._tokenizer = tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def load(cls, model_dir: str) -> ChatTemplate:
        """Blocking (imports transformers, reads files): call from a worker thread."""
        path = Path(model_dir) if model_dir and model_dir != "null" else None
        if path is None or not (path / "tokenizer_config.json").exists():
            return cls(None)
        try:
            from transformers import AutoTokenizer

            return cls(AutoTokenizer.from_pretrained(path))
        except Exception as exc:  # a broken tokenizer must not stop the bridge
            log.warning("no chat template: cannot load the tokenizer in %s: %s", path, exc)
            return cls(None)

    def render(self, messages: list[dict[str, str]]) -> str:
        if self.has_template and self._tokenizer is not None:
            text = self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            return str(text)
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])
