"""Bounded parsing of tenants' bytes: JSON, regular expressions and raw float tensors.

Everything here runs on untrusted input inside a gateway worker thread (and again in an
executor's loading thread), so each function has two duties: return a typed
:class:`InvalidAdapter` for every bad input, never another exception; and never hold the GIL for
long, because a worker thread that holds the GIL stalls the Trio event loop as surely as code
on the loop itself.

Why a thread is enough (no process pool):

* Python code in a thread gives the GIL up every ``sys.getswitchinterval()`` (5 ms). What can
  still stall the loop is one C-level call that keeps the GIL for long, so every such call
  here is bounded by an input cap, or releases the GIL:

  - JSON goes through msgspec with a bounded-depth schema: 50,000 nested brackets fail at
    the first level past the bound, without recursion, and the input is capped
    (``adapter_config.json`` at 256 KiB, a safetensors header at 2 MiB), so one decode holds
    the GIL for a few milliseconds at most. (The stdlib parser recurses until RecursionError
    and is slower: under the old 100 MiB header cap one parse held the GIL for seconds.)
    Integers in a header are bounded to 64 bits before any arithmetic on them.
  - Regular expressions are matched by RE2, in time linear in the text; the texts are the
    base model's own module names (a few dozen characters), each pattern is capped at
    :data:`MAX_PATTERN_CHARS` and compiled with ``max_mem`` :data:`RE2_MAX_MEM`, so a compile
    is bounded (a few milliseconds), and RE2's match releases the GIL. Python's ``re`` only
    *compiles* each pattern (pure Python apart from a final linear step), to refuse what PEFT
    itself could not load; it never matches tenant patterns.
  - The finiteness scan uses numpy ufuncs on chunks of :data:`SCAN_CHUNK_ELEMS` elements;
    numpy releases the GIL inside them. hashlib releases it while hashing large buffers.

* The total work is bounded by a :class:`Budget`: every loop over modules, patterns, tensors
  and chunks checks a deadline, so no upload holds a worker thread for more than about the
  budget (each step between checks takes milliseconds: one pattern compiled or matched, one
  header entry, one chunk scanned or hashed), and the refusal names the reason ("too complex
  to validate"). A process pool would add a process start or a pickled copy of each upload
  for no gain in bound, since nothing left can run long without checking in.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Union

import msgspec
import numpy as np
import re2

from vajra.errors import InvalidRequest

#: Longest regular expression accepted in ``target_modules`` or as a pattern key.
MAX_PATTERN_CHARS = 1_000
#: Most keys accepted in ``rank_pattern`` or ``alpha_pattern`` (PEFT's own EVA writes one per
#: module, about 900 for a 405B Llama).
MAX_PATTERN_KEYS = 2_048
#: RE2's memory budget per compiled pattern; a pattern that needs more is refused. Ordinary
#: module patterns need a few KiB; when the lazy DFA runs out, RE2 falls back to its NFA,
#: still linear.
RE2_MAX_MEM = 256 * 1024
#: Largest ``adapter_config.json`` accepted (PEFT writes a few KiB).
MAX_CONFIG_BYTES = 256 * 1024
#: Deepest nesting of arrays and objects accepted in ``adapter_config.json`` (PEFT's own
#: sub-configs nest about 4 deep). Building the schema costs about 5x more per level, at
#: import in every process that validates: 8 takes milliseconds, 12 a tenth of a second,
#: 20 half a minute.
MAX_CONFIG_DEPTH = 8
#: Elements per step of the finiteness scan (4 MiB of F32).
SCAN_CHUNK_ELEMS = 1 << 20
#: Default time budget for validating one adapter.
DEFAULT_BUDGET_S = 5.0


class InvalidAdapter(InvalidRequest):
    """An adapter upload that Vajra refuses; the message names the problem."""

    def __init__(self, message: str, *, field: str | None = "adapter") -> None:
        super().__init__(message, field=field)


def show(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters, for messages about untrusted values."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class Budget:
    """A deadline for one validation; :meth:`check` raises InvalidAdapter once it has passed.

    ``seconds=None``: no deadline (``check`` never raises).
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._deadline = math.inf if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() >= self._deadline:
            raise InvalidAdapter(
                f"adapter too complex to validate: it took over {self.seconds:g} s"
            )


# --- JSON ---------------------------------------------------------------------------------

_Scalar = Union[str, int, float, bool, None]  # noqa: UP007 (a runtime type for msgspec)


def _bounded_json(depth: int) -> Any:
    """Any JSON value whose arrays and objects nest at most ``depth`` deep."""
    t: Any = _Scalar
    for _ in range(depth):
        t = Union[_Scalar, list[t], dict[str, t]]  # noqa: UP007
    return t


_CONFIG_DECODER = msgspec.json.Decoder(_bounded_json(MAX_CONFIG_DEPTH))
#: A safetensors header: an object of tensor entries (objects of scalars and flat arrays)
#: and ``__metadata__`` (an object of strings). Anything deeper is refused while decoding.
_HeaderValue = Union[_Scalar, list[_Scalar]]  # noqa: UP007
_HEADER_DECODER = msgspec.json.Decoder(
    Union[_Scalar, list[_Scalar], dict[str, Union[_Scalar, list[_Scalar], dict[str, _HeaderValue]]]]  # noqa: UP007
)


def decode_json(data: bytes | memoryview, *, what: str, header: bool = False) -> Any:
    """Decode untrusted JSON bytes with bounded depth; InvalidAdapter naming ``what`` otherwise.

    ``header``: decode as a safetensors header (objects two deep), else as a config
    (:data:`MAX_CONFIG_DEPTH` deep). The caller caps the size.
    """
    decoder = _HEADER_DECODER if header else _CONFIG_DECODER
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "got `array`" in text or "got `object`" in text:
            raise InvalidAdapter(f"{what} nests arrays or objects too deeply ({text})") from None
        raise InvalidAdapter(f"{what} holds a value out of range ({text})") from None
    except msgspec.DecodeError as exc:
        raise InvalidAdapter(f"{what} is not JSON ({exc})") from None
    except (MemoryError, RecursionError, ValueError, UnicodeError, OverflowError) as exc:
        raise InvalidAdapter(f"{what} cannot be parsed ({type(exc).__name__})") from None


# --- regular expressions --------------------------------------------------------------------


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.max_mem = RE2_MAX_MEM
    options.log_errors = False
    return options


_RE2_OPTIONS = _re2_options()
_SET_OPERATORS = ("--", "&&", "~~", "||")


def _portability_problem(pattern: str) -> str | None:
    """Syntax that Python's ``re`` (what PEFT uses) and RE2 both accept but read differently.

    * ``[`` inside a character class: RE2 reads ``[[:alpha:]]`` as a POSIX class, Python as a
      set followed by a literal ``]`` (with a FutureWarning about nested sets);
    * ``--``, ``&&``, ``~~``, ``||`` inside a class (Python warns of future set operations);
    * ``{,n}``: Python repeats 0..n times, RE2 matches the literal text.
    """
    i, n = 0, len(pattern)
    in_class = False
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if c == "[":
                return "a '[' inside a character class"
            if pattern[i : i + 2] in _SET_OPERATORS:
                return f"{pattern[i : i + 2]!r} inside a character class"
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            i += 1
            if pattern[i : i + 1] == "^":
                i += 1
            if pattern[i : i + 1] == "]":  # a leading ']' is a literal in both engines
                i += 1
            continue
        elif c == "{" and pattern[i + 1 : i + 2] == ",":
            return "a '{,n}' repetition"
        i += 1
    return None


def compile_pattern(regex: str, *, field: str, shown: str | None = None) -> re2._Regexp[str]:
    """Compile ``regex`` for RE2, refusing what PEFT's ``re`` would reject or read differently.

    ``field`` names the config entry in messages; ``shown``: the tenant's text to quote, when
    ``regex`` wraps it.
    """
    quoted = show(regex if shown is None else shown, 60)
    if not regex.isascii() or not regex.isprintable():
        raise InvalidAdapter(
            f"adapter_config.json: {field} {quoted} holds characters other than printable "
            "ASCII; module names are ASCII (escape anything else)"
        )
    problem = _portability_problem(regex)
    if problem is not None:
        raise InvalidAdapter(
            f"adapter_config.json: {field} {quoted} uses {problem}, which regex engines read "
            "differently; write it another way"
        )
    try:
        compiled = re2.compile(regex, _RE2_OPTIONS)
    except Exception as exc:  # re2.error, or UnicodeEncodeError for a lone surrogate
        raise InvalidAdapter(
            f"adapter_config.json: {field} {quoted} is not a regular expression Vajra can match "
            f"in linear time ({_re2_reason(exc)}): backreferences, lookaround, possessive or "
            "atomic groups and very large repetitions are not accepted"
        ) from None
    try:
        re.compile(regex)  # what PEFT would do; compiling is bounded, matching never happens
    except Exception as exc:  # re.error, RecursionError, OverflowError
        raise InvalidAdapter(
            f"adapter_config.json: {field} {quoted} is not a Python regular expression "
            f"({show(str(exc), 100)}), so PEFT could not load it either"
        ) from None
    return compiled


def _re2_reason(exc: Exception) -> str:
    reason = exc.args[0] if exc.args else exc
    if isinstance(reason, bytes):
        reason = reason.decode("utf-8", "replace")
    return show(str(reason), 100)


def compile_target_modules(pattern: str) -> re2._Regexp[str]:
    """``target_modules`` as a string: PEFT tests ``re.fullmatch(pattern, module)``."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InvalidAdapter(
            f"adapter_config.json: target_modules is {len(pattern)} characters long; "
            f"the limit is {MAX_PATTERN_CHARS}"
        )
    return compile_pattern(pattern, field="target_modules")


def compile_pattern_keys(
    patterns: dict[str, Any], *, field: str, budget: Budget
) -> list[re2._Regexp[str]]:
    """The keys of ``rank_pattern`` / ``alpha_pattern``, in order, as PEFT's
    ``get_pattern_key`` matches them: ``re.match(rf"(.*\\.)?({key})$", module)``."""
    if len(patterns) > MAX_PATTERN_KEYS:
        raise InvalidAdapter(
            f"adapter_config.json: {field} has {len(patterns)} keys; "
            f"the limit is {MAX_PATTERN_KEYS}"
        )
    compiled = []
    for key in patterns:
        budget.check()
        if len(key) > MAX_PATTERN_CHARS:
            raise InvalidAdapter(
                f"adapter_config.json: a {field} key is {len(key)} characters long; "
                f"the limit is {MAX_PATTERN_CHARS}"
            )
        compiled.append(compile_pattern(rf"(.*\.)?({key})$", field=f"{field} key", shown=key))
    return compiled


# --- tensor data ------------------------------------------------------------------------------

#: safetensors dtype -> (little-endian unsigned view, exponent mask, mantissa mask, sign bit)
_FLOAT_BITS: dict[str, tuple[str, int, int, int]] = {
    "F32": ("<u4", 0x7F80_0000, 0x007F_FFFF, 0x8000_0000),
    "F16": ("<u2", 0x7C00, 0x03FF, 0x8000),
    "BF16": ("<u2", 0x7F80, 0x007F, 0x8000),
}


def first_non_finite(
    data: bytes, start: int, end: int, dtype: str, budget: Budget
) -> tuple[int, str] | None:
    """The flat index and kind ("NaN", "+Inf", "-Inf") of the first non-finite element of the
    ``dtype`` tensor stored in ``data[start:end]``, or None when all are finite.

    Reads the bits (a value is non-finite iff its exponent bits are all ones), never decodes
    through pickle or torch, in chunks so the budget is checked and numpy releases the GIL.
    """
    view, exponent, mantissa, sign = _FLOAT_BITS[dtype]
    itemsize = int(view[-1])
    count = (end - start) // itemsize
    for first in range(0, count, SCAN_CHUNK_ELEMS):
        budget.check()
        n = min(SCAN_CHUNK_ELEMS, count - first)
        bits = np.frombuffer(data, dtype=view, count=n, offset=start + first * itemsize)
        bad = np.bitwise_and(bits, exponent) == exponent
        if bad.any():
            index = int(np.flatnonzero(bad)[0])
            value = int(bits[index])
            kind = "NaN" if value & mantissa else ("-Inf" if value & sign else "+Inf")
            return first + index, kind
    return None
