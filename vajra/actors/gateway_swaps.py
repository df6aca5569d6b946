"""The gateway's warm hot swap of one adapter name: stage, warm, flip (docs/hot-swap.md).

A new active version (a push, a rollback) is made active in three steps: it is registered
*staged* (the caller did that); the scheduler has every executor holding the currently
active version load the new one (:mod:`vajra.actors.scheduler_swaps`, bounded by
``adapters.swap_warm_timeout_s``); then the registry's pointer flips with a compare-and-set
on the version seen active (:meth:`vajra.state.adapters.AdapterRecords.activate`). When
another swap moved the pointer meanwhile, the swap starts again from the new active version
(:data:`SWAP_TRIES` tries, then InvalidRequest, field ``version``: the version stays staged,
answering ``NAME@VERSION``, and can be deleted). Swaps of one name through one gateway run
one at a time; across gateways the compare-and-set orders them. A warm that did not reach
every executor (slow, failed, lost) does not stop the flip: it costs that executor one cold
load, and is counted in :attr:`Swapper.unwarmed`.

Requests keep the version resolved at their admission, so none mixes versions; this gateway
forgets the name's cached resolutions at the flip, other gateways within
``adapters.resolve_cache_ttl_s`` (their requests meanwhile run on the old version, whole).
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Callable

import trio

from vajra.actors.scheduler_swaps import SwapClient
from vajra.adapters.versions import AdapterVersion
from vajra.bus.messages import AdapterSwap
from vajra.config import VajraConfig
from vajra.errors import InvalidRequest, NotFoundError
from vajra.state import OffLoop
from vajra.state.adapters import AdapterRecords

log = logging.getLogger("vajra.gateway")

#: Tries of one swap when concurrent swaps keep moving the pointer first.
SWAP_TRIES = 3


class Swapper:
    """See the module docstring. ``swaps``: the link to the scheduler (None: flip without
    warming); ``forget(tenant_id, name)`` clears the gateway's resolutions of a name."""

    def __init__(
        self,
        cfg: VajraConfig,
        registry: AdapterRecords,
        swaps: SwapClient | None,
        *,
        forget: Callable[[str, str], None],
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.swaps = swaps
        self.redis = OffLoop()
        self._forget = forget
        self._locks: dict[tuple[str, str], trio.Lock] = {}
        self.swapped = 0
        self.unwarmed = 0

    async def swap_to(self, tenant_id: str, target: AdapterVersion) -> AdapterVersion:
        """Make ``target`` the active version the warm way (see the module docstring).

        Raises InvalidRequest (field ``version``) when concurrent swaps moved the pointer
        first on every try, NotFoundError when the version was deleted meanwhile,
        UnavailableError when Redis does not answer. Cancellation before the flip leaves the
        pointer where it was.
        """
        key = (tenant_id, target.name)
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                return await self._swap_to(tenant_id, target)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(key, None)

    async def _swap_to(self, tenant_id: str, target: AdapterVersion) -> AdapterVersion:
        a = self.cfg.adapters
        rpc = self.cfg.bus.rpc_timeout_s
        for _ in range(SWAP_TRIES):
            with trio.fail_after(rpc):
                current = await self._active(tenant_id, target.name)
            if current is not None and current.version == target.version:
                return current
            if current is not None and self.swaps is not None:
                swap = AdapterSwap(
                    swap_id=uuid.uuid4().hex,
                    tenant_id=tenant_id,
                    name=target.name,
                    from_digest=current.digest,
                    to_version=target.version,
                    to_digest=target.digest,
                    to_object_key=target.object_key,
                    wait_ms=int(a.swap_warm_timeout_s * 1000),
                )
                done = await self.swaps.request(swap, a.swap_warm_timeout_s + rpc)
                if not done.ok:
                    self.unwarmed += 1
                    log.warning("swap of %s not warm everywhere: %s", target.name, done.error)
            try:
                with trio.fail_after(rpc):
                    active: AdapterVersion = await self.redis.run(
                        functools.partial(
                            self.registry.activate,
                            tenant_id,
                            target.name,
                            target.version,
                            expect_active=0 if current is None else current.version,
                        )
                    )
            except InvalidRequest as exc:
                if exc.field != "version":
                    raise
                continue  # another swap flipped first: warm again from its version
            finally:
                self._forget(tenant_id, target.name)
            self.swapped += 1
            return active
        raise InvalidRequest(
            f"adapter {target.name!r}: other swaps kept moving the active version; version "
            f"{target.version} stays staged, retry",
            field="version",
        )

    async def _active(self, tenant_id: str, name: str) -> AdapterVersion | None:
        try:
            version: AdapterVersion = await self.redis.run(self.registry.get, tenant_id, name)
        except NotFoundError:
            return None
        return version
