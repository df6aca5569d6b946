"""Examples to token ids and a loss mask: which tokens a training step learns to predict.

- ``{"prompt", "completion"}``: the prompt is encoded as the engine encodes a prompt (with the
  tokenizer's special tokens, BOS in front for Llama-style tokenizers, unless it already
  starts with the BOS text), the completion without special tokens, then EOS; the targets are
  the completion's tokens and the EOS, so the served adapter learns to stop.
- ``{"text"}``: encoded with special tokens, plus EOS; every token but the first is a target.
- ``{"messages"}``: rendered by the tokenizer's chat template; the targets are each assistant
  turn as the template renders it (the tokens that rendering ``messages[: i + 1]`` adds after
  rendering ``messages[:i]`` with the generation prompt). A tokenizer without a chat
  template, or one whose rendering of a conversation is not its prefix's rendering plus more,
  is refused with :class:`~vajra.training.dataset.InvalidDataset`.

``loss_mask[i]`` says token ``i`` is a target (predicted from tokens ``0 .. i - 1``);
``loss_mask[0]`` is always False. A line longer than ``max_len`` tokens, or one with no
target token, is refused naming the line. Runs on the CPU only; nothing touches a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vajra.training.dataset import Example, InvalidDataset


@dataclass(frozen=True, slots=True)
class TrainExample:
    """One tokenized example: ``input_ids`` and, per token, whether it is a target."""

    input_ids: list[int]
    loss_mask: list[bool]

    @property
    def num_targets(self) -> int:
        return sum(self.loss_mask)


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, *, max_len: int
) -> list[TrainExample]:
    """Tokenize every example (module docstring); raise :class:`InvalidDataset` naming the
    first line that is too long, has nothing to learn, or cannot be rendered."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidDataset("the model's tokenizer has no EOS token to end completions with")
    out = []
    for number, example in enumerate(examples, start=1):
        line = example.line or number
        if example.messages is not None:
            ids, mask = _chat(example.messages, tokenizer, line)
        elif example.text is not None:
            ids = [*_encode(tokenizer, example.text, special=True), eos]
            mask = [False] + [True] * (len(ids) - 1)
        else:
            prompt = _encode(tokenizer, example.prompt or "", special=True)
            if not prompt and tokenizer.bos_token_id is not None:
                prompt = [tokenizer.bos_token_id]
            completion = [*_encode(tokenizer, example.completion or "", special=False), eos]
            ids = prompt + completion
            mask = [False] * len(prompt) + [True] * len(completion)
            if not prompt:  # the first token has nothing before it to be predicted from
                mask[0] = False
        if len(ids) > max_len:
            raise InvalidDataset(
                f"{len(ids)} tokens, over the limit of {max_len} (the model's context or "
                "max_micro_tokens)",
                line=line,
            )
        if not any(mask):
            raise InvalidDataset("nothing to learn: no target token", line=line)
        out.append(TrainExample(input_ids=ids, loss_mask=mask))
    return out


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    if special:
        bos = tokenizer.bos_token
        special = not (bos and text.startswith(bos))
    return list(tokenizer.encode(text, add_special_tokens=special))


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation: bool) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=generation
    )
    if isinstance(rendered, dict) or hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return [int(t) for t in rendered]


def _chat(
    messages: tuple[tuple[str, str], ...], tokenizer: Any, line: int
) -> tuple[list[int], list[bool]]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidDataset(
            "chat messages need a chat template, and the model's tokenizer has none",
            line=line,
            key="messages",
        )
    turns = [{"role": role, "content": content} for role, content in messages]
    ids: list[int] = []
    mask: list[bool] = []
    for i, (role, _) in enumerate(messages):
        if role == "assistant":
            prefix = _render(tokenizer, turns[:i], generation=True) if i else []
            if prefix[: len(ids)] != ids:
                raise _not_incremental(line)
            mask += [False] * (len(prefix) - len(ids))
            ids = prefix
        rendered = _render(tokenizer, turns[: i + 1], generation=False)
        if rendered[: len(ids)] != ids:
            raise _not_incremental(line)
        mask += [role == "assistant"] * (len(rendered) - len(ids))
        ids = rendered
    if mask:
        mask[0] = False
    return ids, mask


def _not_incremental(line: int) -> InvalidDataset:
    return InvalidDataset(
        "the tokenizer's chat template does not render a conversation as its beginning "
        "plus more, so the assistant turns cannot be located",
        line=line,
        key="messages",
    )
