"""Training datasets: JSON Lines in one of three shapes, parsed and checked before any GPU work.

Each non-blank line is one JSON object of exactly one shape:

- ``{"prompt": str, "completion": str}``: the loss covers the completion's tokens (and EOS);
- ``{"text": str}``: the loss covers every token;
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: rendered
  with the tokenizer's chat template; the loss covers the assistant turns.

Anything else (bytes that are not UTF-8, a line that is not a JSON object, a missing, empty
or ill-typed field, an unknown key, a mix of shapes in one line, a chat without an
assistant turn, an empty file, a file over the size limit or with too many examples) is
refused with :class:`InvalidDataset`, whose message names the line number (1-based) and
the field. Token lengths are checked later, by the tokenizer step, which knows the model's
context. Pure code: no torch, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from vajra.errors import InvalidRequest

#: The roles a chat message may have.
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
_SHAPES = ({"prompt", "completion"}, {"text"}, {"messages"})
_KNOWN = {"prompt", "completion", "text", "messages"}


class InvalidDataset(InvalidRequest):
    """A training dataset refused before training; ``field`` is ``dataset`` or
    ``dataset.<key>`` and ``line`` the 1-based line number (0: the file as a whole)."""

    def __init__(self, message: str, *, line: int = 0, key: str | None = None) -> None:
        where = f"line {line}: " if line else ""
        super().__init__(f"{where}{message}", field=f"dataset.{key}" if key else "dataset")
        self.line = line


@dataclass(frozen=True, slots=True)
class Example:
    """One parsed line; exactly one of the shapes is set (the others are None)."""

    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content)
    line: int = 0  # 1-based line number in the file, for error messages

    @property
    def kind(self) -> str:
        """``"prompt_completion"``, ``"text"`` or ``"chat"``."""
        if self.messages is not None:
            return "chat"
        if self.text is not None:
            return "text"
        return "prompt_completion"


def dataset_digest(data: bytes) -> str:
    """``"sha256:<hex>"`` of the file's bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_dataset(data: bytes, *, max_bytes: int, max_examples: int) -> list[Example]:
    """Parse and check a JSON Lines dataset; blank lines are skipped.

    Raises :class:`InvalidDataset` (see the module docstring) for the first problem found.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidDataset("the dataset must be bytes")
    if len(data) > max_bytes:
        raise InvalidDataset(f"the dataset is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        line = bytes(data)[: exc.start].count(b"\n") + 1
        raise InvalidDataset("not UTF-8 text (JSON Lines expected)", line=line) from None
    text = text.removeprefix("\ufeff")
    examples: list[Example] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        if len(examples) >= max_examples:
            raise InvalidDataset(f"more than {max_examples} examples (the limit)", line=number)
        examples.append(_parse_line(raw, number))
    if not examples:
        raise InvalidDataset("the dataset is empty (JSON Lines with one example per line)")
    return examples


def _parse_line(raw: str, line: int) -> Example:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidDataset("not a JSON object (JSON Lines expected)", line=line) from None
    if not isinstance(obj, dict):
        raise InvalidDataset(f"a line must be a JSON object, not {type(obj).__name__}", line=line)
    unknown = sorted(k for k in obj if k not in _KNOWN)
    if unknown:
        raise InvalidDataset(
            f"unknown key {unknown[0]!r} (expected prompt/completion, text or messages)",
            line=line,
            key=unknown[0],
        )
    keys = set(obj)
    if "messages" in keys:
        if keys != {"messages"}:
            raise InvalidDataset(
                "messages cannot be mixed with other keys", line=line, key="messages"
            )
        return Example(messages=_messages(obj["messages"], line), line=line)
    if "text" in keys:
        if keys != {"text"}:
            raise InvalidDataset("text cannot be mixed with other keys", line=line, key="text")
        return Example(text=_string(obj, "text", line), line=line)
    for needed in ("prompt", "completion"):
        if needed not in keys:
            raise InvalidDataset(
                f"missing field {needed!r} (expected prompt/completion, text or messages)",
                line=line,
                key=needed,
            )
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise InvalidDataset("prompt must be a string", line=line, key="prompt")
    return Example(prompt=prompt, completion=_string(obj, "completion", line), line=line)


def _string(obj: dict[str, Any], key: str, line: int) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value:
        raise InvalidDataset(f"{key} must be a non-empty string", line=line, key=key)
    return value


def _messages(value: object, line: int) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise InvalidDataset("messages must be a non-empty list", line=line, key="messages")
    out: list[tuple[str, str]] = []
    for i, message in enumerate(value):
        key = f"messages[{i}]"
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise InvalidDataset(
                "each message must be an object with exactly role and content",
                line=line,
                key=key,
            )
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise InvalidDataset(
                f"role must be one of {', '.join(CHAT_ROLES)}, not {role!r}",
                line=line,
                key=f"{key}.role",
            )
        if not isinstance(content, str):
            raise InvalidDataset("content must be a string", line=line, key=f"{key}.content")
        out.append((role, content))
    if not any(role == "assistant" and content for role, content in out):
        raise InvalidDataset(
            "a chat needs at least one non-empty assistant message (the training target)",
            line=line,
            key="messages",
        )
    return tuple(out)
