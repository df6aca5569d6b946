"""Checks of the arguments the key owners store or build keys from, and the store's clock.

Each check raises :class:`~vajra.errors.InvalidRequest` naming the field, before anything is
written, and returns the checked value.
"""

from __future__ import annotations

import re
import time

from vajra.errors import InvalidRequest

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def now_ms() -> int:
    """Milliseconds since the Unix epoch (the unit of every ``*_ms`` field in the store)."""
    return time.time_ns() // 1_000_000


def check_id(value: object, field: str) -> str:
    """An id that may appear in a key: 1-128 characters of ``[A-Za-z0-9_.-]``."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise InvalidRequest(f"{field} must be 1-128 characters of [A-Za-z0-9_.-]", field=field)
    return value


def check_non_negative_int(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"{field} must be a non-negative integer", field=field)
    return value
