"""What a fine-tuning job may ask for: :class:`TrainParams` and the cluster's :class:`TrainBounds`.

The client SDK builds :class:`TrainParams`, the wire carries its :meth:`~TrainParams.to_dict`,
the gateway checks it against the cluster's limits (:func:`check_train_params`), and the
executor's trainer (``vajra.gpu.training``) trains with it. Construction applies every
intrinsic rule and raises :class:`~vajra.errors.InvalidRequest` naming the first bad field,
so an instance is always valid. Pure code: no I/O, no torch.

Semantics of the fields (the trainer implements exactly this, and the PEFT comparison in
the tests uses the same meaning):

- the dataset's examples are shuffled once per epoch by a generator seeded with
  ``seed + epoch``; an *optimizer step* takes the next ``batch_size * grad_accum_steps``
  examples (the last step of an epoch may take fewer) and applies AdamW once;
- the loss of a step is the mean cross-entropy over all *target* tokens of all its examples
  (completion tokens only; every token for ``{"text"}`` lines), i.e. the sum of the token
  losses divided by the number of target tokens of the whole step, so gradient accumulation
  and the split into micro-steps do not change the result;
- a *micro-step* carries at most ``max_micro_tokens`` tokens (padding included), which bounds
  the time it takes and so the latency it can add to inference;
- ``max_steps`` (when > 0) stops after that many optimizer steps, else ``epochs`` decide;
- LoRA: ``rank``, ``alpha`` (scale ``alpha / rank``) on the linear layers named by
  ``target_modules``; A is drawn like PEFT does (Kaiming-uniform, ``a = sqrt(5)``) from a
  generator seeded with ``seed``, B starts at zero;
- a checkpoint is written every ``checkpoint_every`` optimizer steps (0: only at the end).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from vajra.errors import InvalidRequest

#: ``seed`` is an unsigned 63-bit integer (a torch generator's seed range).
SEED_MAX = 2**63 - 1
#: Intrinsic bounds; a cluster's configured :class:`TrainBounds` are tighter.
EPOCHS_BOUND = 1_000
STEPS_BOUND = 10_000_000
BATCH_SIZE_BOUND = 4_096
GRAD_ACCUM_BOUND = 4_096
RANK_BOUND = 1_024
ALPHA_MAX = 1e6
LEARNING_RATE_MAX = 1.0
WEIGHT_DECAY_MAX = 10.0
MICRO_TOKENS_BOUND = 1_048_576
TARGET_MODULES_BOUND = 32
#: A target module name is a Python-identifier-like token of at most this many characters.
MODULE_NAME_MAX_CHARS = 64


@dataclass(frozen=True, slots=True)
class TrainParams:
    """How one fine-tuning job trains (see the module docstring); always valid once built."""

    epochs: int = 1
    learning_rate: float = 1e-4
    batch_size: int = 4
    grad_accum_steps: int = 1
    max_steps: int = 0
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0
    weight_decay: float = 0.0
    max_micro_tokens: int = 2048
    gradient_checkpointing: bool = False
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        _int_in("epochs", self.epochs, 1, EPOCHS_BOUND)
        _float_in("learning_rate", self.learning_rate, 0.0, LEARNING_RATE_MAX, open_low=True)
        _int_in("batch_size", self.batch_size, 1, BATCH_SIZE_BOUND)
        _int_in("grad_accum_steps", self.grad_accum_steps, 1, GRAD_ACCUM_BOUND)
        _int_in("max_steps", self.max_steps, 0, STEPS_BOUND)
        _int_in("rank", self.rank, 1, RANK_BOUND)
        _float_in("alpha", self.alpha, 0.0, ALPHA_MAX, open_low=True)
        _check_modules(self.target_modules)
        _int_in("seed", self.seed, 0, SEED_MAX)
        _float_in("weight_decay", self.weight_decay, 0.0, WEIGHT_DECAY_MAX)
        _int_in("max_micro_tokens", self.max_micro_tokens, 1, MICRO_TOKENS_BOUND)
        if not isinstance(self.gradient_checkpointing, bool):
            raise InvalidRequest(
                "gradient_checkpointing must be true or false", field="gradient_checkpointing"
            )
        _int_in("checkpoint_every", self.checkpoint_every, 0, STEPS_BOUND)

    @property
    def scaling(self) -> float:
        """LoRA's output scale, ``alpha / rank``."""
        return self.alpha / self.rank

    @property
    def examples_per_step(self) -> int:
        """Examples one optimizer step consumes (the last of an epoch may take fewer)."""
        return self.batch_size * self.grad_accum_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack-safe values (``target_modules`` as a list)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainParams:
        """Build from a mapping; missing keys take their defaults.

        Raises :class:`InvalidRequest` naming the field for an unknown key, a value of the
        wrong type (ints accept integral floats such as ``3.0``; floats accept ints) or a
        value out of range.
        """
        if not isinstance(d, Mapping):
            raise InvalidRequest("training parameters must be an object", field="params")
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if not isinstance(key, str) or key not in known:
                raise InvalidRequest(f"unknown training parameter {key!r}", field=str(key))
            kwargs[key] = _coerce(key, value, getattr(cls(), key))
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class TrainBounds:
    """A cluster's configured limits on training jobs."""

    max_rank: int = 64
    max_epochs: int = 100
    max_steps: int = 100_000
    max_batch_size: int = 64
    max_grad_accum_steps: int = 64
    max_micro_tokens: int = 8_192
    max_learning_rate: float = 1e-2
    max_target_modules: int = 16
    #: Module names a job may target; empty: any name (the trainer refuses names the
    #: model lacks).
    allowed_target_modules: tuple[str, ...] = ()


def check_train_params(p: TrainParams, bounds: TrainBounds) -> None:
    """The cluster's limits on a job's parameters; the intrinsic rules already held when
    ``p`` was built. Raises :class:`InvalidRequest` naming the first field over a limit."""
    _int_in("rank", p.rank, 1, bounds.max_rank)
    _int_in("epochs", p.epochs, 1, bounds.max_epochs)
    _int_in("max_steps", p.max_steps, 0, bounds.max_steps)
    _int_in("batch_size", p.batch_size, 1, bounds.max_batch_size)
    _int_in("grad_accum_steps", p.grad_accum_steps, 1, bounds.max_grad_accum_steps)
    _int_in("max_micro_tokens", p.max_micro_tokens, 1, bounds.max_micro_tokens)
    _float_in("learning_rate", p.learning_rate, 0.0, bounds.max_learning_rate, open_low=True)
    if len(p.target_modules) > bounds.max_target_modules:
        raise InvalidRequest(
            f"target_modules takes at most {bounds.max_target_modules} names",
            field="target_modules",
        )
    if bounds.allowed_target_modules:
        bad = [m for m in p.target_modules if m not in bounds.allowed_target_modules]
        if bad:
            raise InvalidRequest(
                f"target module {bad[0]!r} is not one of "
                f"{', '.join(bounds.allowed_target_modules)}",
                field="target_modules",
            )


def total_optimizer_steps(num_examples: int, p: TrainParams) -> int:
    """Optimizer steps a job over ``num_examples`` examples runs."""
    if num_examples <= 0:
        return 0
    per_epoch = -(-num_examples // p.examples_per_step)
    total = per_epoch * p.epochs
    return min(total, p.max_steps) if p.max_steps > 0 else total


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order of the examples in ``epoch`` (0-based): a shuffle by a generator seeded
    with ``(seed, epoch)`` alone, so a job resumed at any step sees the same order."""
    order = list(range(num_examples))
    random.Random(f"vajra-train:{seed}:{epoch}").shuffle(order)
    return order


def step_examples(num_examples: int, p: TrainParams) -> list[list[int]]:
    """Which examples each optimizer step takes, in order (``total_optimizer_steps`` of
    them): each epoch's order cut into runs of ``examples_per_step`` (the last may be
    shorter)."""
    steps: list[list[int]] = []
    total = total_optimizer_steps(num_examples, p)
    epoch = 0
    while len(steps) < total:
        order = epoch_order(num_examples, p.seed, epoch)
        for first in range(0, num_examples, p.examples_per_step):
            if len(steps) == total:
                break
            steps.append(order[first : first + p.examples_per_step])
        epoch += 1
    return steps


def micro_batches(lengths: Sequence[int], *, max_tokens: int, max_rows: int) -> list[list[int]]:
    """Cut one optimizer step's examples (their token ``lengths``, in order) into micro-batches
    of consecutive examples: at most ``max_rows`` rows, and ``rows * longest`` (the padded
    size) at most ``max_tokens``. Returns the positions in ``lengths`` per micro-batch.

    Raises ``ValueError`` for an example longer than ``max_tokens`` (the dataset check refuses
    those first)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"an example of {n} tokens exceeds max_micro_tokens={max_tokens}")
        wider = max(longest, n)
        if current and (len(current) + 1 > max_rows or (len(current) + 1) * wider > max_tokens):
            batches.append(current)
            current, wider = [], n
        current.append(i)
        longest = wider
    if current:
        batches.append(current)
    return batches


def _check_modules(modules: object) -> None:
    if not isinstance(modules, tuple) or not modules:
        raise InvalidRequest(
            "target_modules must be a non-empty list of module names", field="target_modules"
        )
    if len(modules) > TARGET_MODULES_BOUND:
        raise InvalidRequest(
            f"target_modules takes at most {TARGET_MODULES_BOUND} names", field="target_modules"
        )
    for name in modules:
        if (
            not isinstance(name, str)
            or not 0 < len(name) <= MODULE_NAME_MAX_CHARS
            or not name.replace("_", "a").isalnum()
            or not name.isascii()
        ):
            raise InvalidRequest(
                f"target module names are 1..{MODULE_NAME_MAX_CHARS} letters, digits or "
                f"underscores, not {name!r}",
                field="target_modules",
            )
    if len(set(modules)) != len(modules):
        raise InvalidRequest("target_modules names a module twice", field="target_modules")


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InvalidRequest(f"{key} must be true or false", field=key)
        return value
    if isinstance(default, int):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{key} must be an integer", field=key)
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"{key} must be a number", field=key)
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, list | tuple):
            raise InvalidRequest(f"{key} must be a list of strings", field=key)
        return tuple(value)
    raise InvalidRequest(f"{key} has an unsupported type", field=key)  # pragma: no cover


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(field: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{field} must be an integer between {low} and {high}", field=field)


def _float_in(
    field: str, value: object, low: float, high: float, *, open_low: bool = False
) -> None:
    ok = _is_number(value) and (
        low < value <= high if open_low else low <= value <= high  # type: ignore[operator]
    )
    if not ok:
        bracket = "(" if open_low else "["
        raise InvalidRequest(f"{field} must be in {bracket}{low:g}, {high:g}]", field=field)


#: The paper's rule (Eq. 11): inference has ten times training's priority.
DEFAULT_INFERENCE_RATIO = 10


class InterleaveRule:
    """What the executor's model thread runs next when a training job shares it with
    inference: ``"inference"`` (one engine step), ``"train"`` (one bounded micro-step) or
    ``"idle"``.

    With ``preemption_enabled`` inference goes first: while inference work is pending it
    runs, and training only gets a micro-step when no inference is pending or, so that a
    job under a steady load is not starved, after ``inference_ratio`` inference steps in a
    row while training waited (inference's priority ten times training's by default;
    0: training runs only when inference is idle). Without preemption the two alternate
    whenever both are pending. Either way at most one micro-step runs between two inference
    steps, so the latency a job adds to a token is bounded by one micro-step's time, which
    ``max_micro_tokens`` bounds.
    """

    def __init__(
        self, *, preemption_enabled: bool = True, inference_ratio: int = DEFAULT_INFERENCE_RATIO
    ) -> None:
        _int_in("inference_ratio", inference_ratio, 0, 1_000_000)
        self.preemption_enabled = preemption_enabled
        self.inference_ratio = inference_ratio
        self._streak = 0  # inference steps in a row while training waited
        self._last = ""

    def next(self, *, inference_pending: bool, training_pending: bool) -> str:
        """The next thing to run; call once per unit of work actually run."""
        if not training_pending:
            choice = "inference" if inference_pending else "idle"
        elif not inference_pending:
            choice = "train"
        elif not self.preemption_enabled:
            choice = "train" if self._last == "inference" else "inference"
        elif self.inference_ratio and self._streak >= self.inference_ratio:
            choice = "train"
        else:
            choice = "inference"
        if choice == "inference" and training_pending:
            self._streak += 1
        elif choice == "train":
            self._streak = 0
        if choice != "idle":
            self._last = choice
        return choice
