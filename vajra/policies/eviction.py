"""Which adapter leaves a tier: the eviction choices of the executor's adapter tiers.

Every tier lists its adapters least recently used first, and every choice here walks that
order. An adapter that is *in use* — held by a running request, wanted by a load in progress,
or pinned while a copy reads it — is never chosen; the caller says which are in use.

* GPU memory: :func:`lru_victim` among the idle adapters whose eviction frees pages the
  incoming adapter lacks (the caller's predicate says which do); after a load, :func:`threshold_victims` names the
  idle adapters to evict once more than ``adapters.lru_eviction_threshold`` of the slots are
  resident (:func:`resident_limit`).
* Host slots: :func:`lru_victim` among the entries of one rank class.
* Local disk: :func:`victims_to_fit` — whole entries, oldest first, until a new one fits in
  the byte budget (nothing on disk is ever in use: readers hold their own copy).

Pure code: no I/O; the simulator and the executor call the same functions.
"""

from __future__ import annotations

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
    lru: Iterable[K], in_use: Callable[[K], bool], num_slots: int, threshold: float
) -> list[K]:
    """The idle adapters to evict, least recently used first, to come down to
    :func:`resident_limit` (fewer when too many are in use)."""
    resident = list(lru)
    excess = len(resident) - resident_limit(num_slots, threshold)
    if excess <= 0:
        return []
    return [key for key in resident if not in_use(key)][:excess]


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
