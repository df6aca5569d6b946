"""Running blocking calls (Redis, above all) from Trio without blocking its event loop.

Every sync call into :mod:`vajra.state` made from Trio code goes through an :class:`OffLoop`::

    redis = OffLoop()
    tenant = await redis.run(state.api_keys.authenticate, api_key)

so there is one way to do it, typed end to end: ``run`` takes exactly the arguments ``fn``
takes and returns what ``fn`` returns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import trio

__all__ = ["OffLoop"]

P = ParamSpec("P")
R = TypeVar("R")


class OffLoop:
    """Runs sync calls in worker threads, at most ``max_threads`` of them at once.

    More calls wait their turn (one :class:`trio.CapacityLimiter`). On cancellation the call
    in flight is not abandoned: :meth:`run` waits for it to finish (a Redis call is bounded by
    its socket timeout) and returns its result, and the cancellation takes effect at the
    caller's next checkpoint; so a write never runs on behind the caller's back. Exceptions
    raised by ``fn`` propagate unchanged.
    """

    def __init__(self, max_threads: int = 4) -> None:
        self._limiter = trio.CapacityLimiter(max_threads)

    async def run(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """``fn(*args, **kwargs)`` in a worker thread; its result or its exception."""
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self._limiter
        )
