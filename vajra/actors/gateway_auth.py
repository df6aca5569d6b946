"""The gateway's API-key cache: who a key belongs to, asked of Redis as rarely as possible,
and never so often that a flood of unknown keys can exhaust the gateway.

* A hit is a dictionary lookup. An entry lives ``ttl_s`` (a key that belongs to no tenant:
  ``negative_ttl_s``) and is refreshed in the background once half its life has passed, so a
  busy key never misses; a key revoked in Redis behind the gateway's back stops working within
  ``ttl_s``.
* At most ``max_entries`` entries: past that the least recently refreshed goes (a busy key is
  refreshed every half-life, so it stays young; a flood of random keys only evicts itself).
* Lookups in flight are bounded, in all (``max_pending``) and per client connection
  (``max_pending_per_client``): :meth:`AuthCache.reserve` says no beyond either bound and the
  gateway sheds the request with ``overloaded`` at once, instead of starting a task that waits
  on Redis. Lookups of one key are shared (single flight).
* A key that cannot be one Vajra issued (empty, or longer than :data:`MAX_KEY_CHARS`) is
  refused without a lookup.

Not thread-safe: the gateway's Trio task owns it.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from typing import NamedTuple

import trio

from vajra.state import ClusterState, OffLoop, TenantRecord

#: Longer keys are refused without asking Redis (issued keys are far shorter).
MAX_KEY_CHARS = 256


class AuthEntry(NamedTuple):
    """A cached key lookup: used until ``expires``; refreshed in the background after ``stale``."""

    tenant: TenantRecord | None
    expires: float  # time.monotonic()
    stale: float


class AuthCache:
    """See the module docstring."""

    def __init__(
        self,
        state: ClusterState,
        *,
        ttl_s: float,
        negative_ttl_s: float,
        max_entries: int,
        max_pending: int,
        max_pending_per_client: int,
        counters: Counter[str],
    ) -> None:
        self.state = state
        self.redis = OffLoop()  # Redis calls, off the event loop
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_entries = max(1, max_entries)
        self.max_pending = max(1, max_pending)
        self.max_pending_per_client = max(1, max_pending_per_client)
        self.counters = counters
        self._entries: OrderedDict[str, AuthEntry] = OrderedDict()
        self._inflight: dict[str, trio.Event] = {}
        self._limiter = trio.CapacityLimiter(64)  # Redis lookups at once
        self._pending = 0
        self._pending_by_client: Counter[bytes] = Counter()
        # Bumped by every revocation: a lookup that began before one is not cached.
        self._epoch = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pending(self) -> int:
        """Lookups reserved and not yet released."""
        return self._pending

    # --- the hot path -------------------------------------------------------------------

    def get(self, api_key: str) -> AuthEntry | None:
        """The fresh entry for ``api_key``, or None (a miss: reserve, then :meth:`lookup`)."""
        entry = self._entries.get(api_key)
        if entry is None or entry.expires <= time.monotonic():
            return None
        return entry

    def take_refresh(self, api_key: str, entry: AuthEntry) -> bool:
        """True once per half-life of a busy entry: the caller then runs a background
        :meth:`lookup` with ``refresh=True`` (the entry stops counting as stale meanwhile)."""
        if entry.stale > time.monotonic():
            return False
        self._entries[api_key] = entry._replace(stale=entry.expires)
        return True

    # --- bounded lookups ----------------------------------------------------------------

    def reserve(self, client: bytes) -> bool:
        """Room for one more lookup from ``client``? Pair a True with :meth:`release`."""
        if self._pending >= self.max_pending:
            self.counters["auth_shed_total"] += 1
            return False
        if self._pending_by_client[client] >= self.max_pending_per_client:
            self.counters["auth_shed_client"] += 1
            return False
        self._pending += 1
        self._pending_by_client[client] += 1
        return True

    def release(self, client: bytes) -> None:
        self._pending -= 1
        self._pending_by_client[client] -= 1
        if self._pending_by_client[client] <= 0:
            del self._pending_by_client[client]

    async def lookup(self, api_key: str, *, refresh: bool = False) -> TenantRecord | None:
        """The key's tenant: from the cache, else one Redis lookup per key at a time.

        Callers that miss while a lookup of the same key is in flight wait for it rather than
        each asking Redis. ``refresh``: ask Redis even if the entry is fresh. Raises what
        the state raises (VajraError) when Redis cannot answer; the caller bounds the wait.
        """
        if not api_key or len(api_key) > MAX_KEY_CHARS:
            return None
        cached = self._entries.get(api_key)
        if not refresh and cached is not None and cached.expires > time.monotonic():
            return cached.tenant
        pending = self._inflight.get(api_key)
        if pending is not None:
            await pending.wait()
            cached = self._entries.get(api_key)
            if cached is not None:
                return cached.tenant
        done = self._inflight[api_key] = trio.Event()
        try:
            epoch = self._epoch
            async with self._limiter:
                tenant = await self.redis.run(self.state.api_keys.authenticate, api_key)
            if epoch == self._epoch:
                self._store(api_key, tenant)
            return tenant
        finally:
            if self._inflight.get(api_key) is done:
                del self._inflight[api_key]
            done.set()

    def _store(self, api_key: str, tenant: TenantRecord | None) -> None:
        ttl = self.ttl_s if tenant is not None else self.negative_ttl_s
        now = time.monotonic()
        self._entries[api_key] = AuthEntry(tenant, now + ttl, now + ttl / 2)
        self._entries.move_to_end(api_key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.counters["auth_cache_evictions"] += 1

    # --- revocation ---------------------------------------------------------------------

    def begin_revocation(self) -> None:
        """Before a revocation is written: lookups already under way will not be cached."""
        self._epoch += 1

    def forget_key(self, api_key: str) -> None:
        """After a revocation was written (call :meth:`begin_revocation` first)."""
        self._epoch += 1
        self._entries.pop(api_key, None)

    def forget_tenant(self, tenant_id: str) -> None:
        """After a tenant was deleted (call :meth:`begin_revocation` first)."""
        self._epoch += 1
        for key, entry in list(self._entries.items()):
            if entry.tenant is not None and entry.tenant.tenant_id == tenant_id:
                del self._entries[key]
