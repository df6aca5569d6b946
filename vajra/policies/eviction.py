"""Which adapter leaves a tier: the eviction choices of the executor's adapter tiers.

Every tier lists its adapters least recently used first, and every choice here walks that
order. An adapter that is *in use* — held by a running request, wanted by a load in progress,
or pinned while a copy reads it — is never chosen; the caller says which are in use.

* GPU memory: :func:`lru_victim` among the idle adapters whose eviction frees pages the
  incoming adapter lacks (the caller's predicate says which do); after a load,
  :func:`threshold_victims` names the idle adapters to evict once more than
  ``adapters.lru_eviction_threshold`` of the slots are resident (:func:`resident_limit`): the
  least recently used, or with fresh forecasts the ones expected farthest away.
* Host slots: :func:`lru_victim` among the entries of one rank class.
* Local disk: :func:`victims_to_fit` — whole entries, oldest first, until a new one fits in
  the byte budget (nothing on disk is ever in use: readers hold their own copy).
* With a predictor (prefetch): :func:`predicted_victim` — Belady's rule on predicted times: the
  idle adapter whose predicted next arrival is farthest leaves (no arrival expected counts as
  never; ties go to the least recently used). For a prefetch, ``protect_ms`` and ``before_ms``
  make it refuse rather than push out an adapter expected within the lookahead or sooner than
  the one coming in (prefetch pollution); the caller then skips the prefetch.

Pure code: no I/O; the simulator and the executor call the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

K = TypeVar("K")


def lru_victim(lru: Iterable[K], in_use: Callable[[K], bool]) -> K | None:
    """The least-recently-used key of ``lru`` that is not in use, or None."""
    return next((key for key in lru if not in_use(key)), None)


def resident_limit(num_slots: int, threshold: float) -> int:
    """How many adapters stay resident after a load: ``threshold`` of the slots, at least one."""
    return max(1, int(num_slots * threshold))


def threshold_victims(
    lru: Iterable[K],
    in_use: Callable[[K], bool],
    num_slots: int,
    threshold: float,
    *,
    next_arrival_ms: Callable[[K], float | None] | None = None,
    now_ms: float = 0.0,
) -> list[K]:
    """The idle adapters to evict to come down to :func:`resident_limit` (fewer when too many
    are in use): least recently used first, or, with ``next_arrival_ms`` (the predictor's, as
    for :func:`predicted_victim`), the ones expected farthest away first (no arrival expected
    ranks farthest, a time already past as ``now_ms``; ties go to the least recently used)."""
    resident = list(lru)
    excess = len(resident) - resident_limit(num_slots, threshold)
    if excess <= 0:
        return []
    idle = [key for key in resident if not in_use(key)]
    if next_arrival_ms is None:
        return idle[:excess]

    def expected(key: K) -> float:
        at = next_arrival_ms(key)
        if at is None or at != at:
            return math.inf
        return at if at > now_ms else now_ms

    # sorted() is stable: among equal forecasts the least recently used stays first.
    return sorted(idle, key=expected, reverse=True)[:excess] if excess < len(idle) else idle


def victims_to_fit(
    lru: Iterable[tuple[K, int]], used_bytes: int, capacity_bytes: int, size_bytes: int
) -> list[K]:
    """The entries to delete, least recently used first, so that ``size_bytes`` more fit.

    ``lru`` yields (entry, its bytes). When even deleting everything leaves too little room,
    every entry is named: the caller refuses entries larger than the capacity beforehand.
    """
    victims = []
    for key, nbytes in lru:
        if used_bytes + size_bytes <= capacity_bytes:
            break
        victims.append(key)
        used_bytes -= nbytes
    return victims


def predicted_victim(
    lru: Iterable[K],
    in_use: Callable[[K], bool],
    next_arrival_ms: Callable[[K], float | None],
    *,
    now_ms: float,
    protect_ms: float = 0.0,
    before_ms: float | None = None,
) -> K | None:
    """The idle key of ``lru`` whose predicted next arrival is farthest, or None.

    ``lru`` lists keys least recently used first; ``next_arrival_ms(key)`` is the predictor's
    answer (ms on the caller's clock; None or NaN: no arrival expected, which ranks farthest; a
    time already past: expected any moment, which ranks as ``now_ms``). Ties go to the least
    recently used. A key expected by ``now_ms + protect_ms`` is never chosen, nor one expected by
    ``before_ms`` (pass the incoming adapter's predicted arrival for a prefetch: it may only
    push out an adapter needed later than itself). None when no key qualifies: every key is in
    use or protected (a demand load then falls back to :func:`lru_victim`; a prefetch is
    skipped). Never raises for odd predictions: infinities and NaN are ordered as above.
    """
    floor = now_ms + protect_ms if protect_ms > 0 else -math.inf  # NaN and <= 0: no guard
    if before_ms is not None and before_ms == before_ms:
        floor = max(floor, before_ms)
    best: K | None = None
    best_at = -math.inf
    for key in lru:
        if in_use(key):
            continue
        at = next_arrival_ms(key)
        if at is None or at != at:
            at = math.inf
        elif at < now_ms:
            at = now_ms
        if at > best_at and (at > floor or at == math.inf):
            best, best_at = key, at
            if at == math.inf:
                break  # nothing ranks farther; the first such is the least recently used
    return best
