"""Per-tenant request limits: a token bucket for the rate and a count of requests in flight.

Pure code with the time passed in, used by the gateway for every tenant operation: a
generation takes one token of the tenant's bucket and one in-flight slot (released when it
ends); a query or an adapter operation takes one token only.

- Rate: ``rate_per_s`` tokens a second refill a bucket of ``burst`` tokens; an empty bucket
  refuses with ``rate_limited`` and says when the next token arrives.
- Concurrency: at most ``max_inflight`` generations of one tenant at once; more are refused
  with ``concurrency_limited``.
- A value <= 0 turns that limit off.

Scope: one gateway enforces its own budget. A cluster of N gateways behind a load balancer
lets a tenant use N times the rate and the concurrency; configure each gateway with 1/N of
what a tenant may use in all (documented in ``config/vajra.toml``).

Memory: a tenant's state is dropped once its bucket is full again and it has nothing in flight
(it would be rebuilt identically), checked when more than ``max_tenants`` are held.
"""

from __future__ import annotations

from dataclasses import dataclass

from vajra.errors import ErrorCode, RateLimited


@dataclass(slots=True)
class _Tenant:
    tokens: float
    updated: float
    inflight: int = 0


class TenantLimits:
    """See the module docstring. ``now`` is any monotonic clock in seconds."""

    def __init__(
        self,
        *,
        rate_per_s: float,
        burst: int,
        max_inflight: int,
        max_tenants: int = 100_000,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1, burst)
        self.max_inflight = max_inflight
        self.max_tenants = max_tenants
        self._tenants: dict[str, _Tenant] = {}

    def admit(self, tenant_id: str, now: float, *, generation: bool) -> RateLimited | None:
        """Take what one operation costs, or return the refusal (nothing taken then).

        ``generation``: it also takes an in-flight slot; pair with :meth:`release`.
        """
        t = self._tenant(tenant_id, now)
        if generation and 0 < self.max_inflight <= t.inflight:
            return RateLimited(
                f"more than {self.max_inflight} requests of this tenant in flight",
                retry_after_s=1.0,
                code=ErrorCode.CONCURRENCY_LIMITED,
            )
        if self.rate_per_s > 0:
            if t.tokens < 1.0:
                return RateLimited(
                    f"over {self.rate_per_s:g} requests per second",
                    retry_after_s=(1.0 - t.tokens) / self.rate_per_s,
                )
            t.tokens -= 1.0
        if generation:
            t.inflight += 1
        return None

    def release(self, tenant_id: str) -> None:
        """A generation admitted by :meth:`admit` ended."""
        t = self._tenants.get(tenant_id)
        if t is not None and t.inflight > 0:
            t.inflight -= 1

    def inflight(self, tenant_id: str) -> int:
        t = self._tenants.get(tenant_id)
        return 0 if t is None else t.inflight

    def __len__(self) -> int:
        return len(self._tenants)

    def _tenant(self, tenant_id: str, now: float) -> _Tenant:
        t = self._tenants.get(tenant_id)
        if t is None:
            if len(self._tenants) >= self.max_tenants:
                self._prune(now)
            t = self._tenants[tenant_id] = _Tenant(float(self.burst), now)
        elif self.rate_per_s > 0:
            t.tokens = min(float(self.burst), t.tokens + (now - t.updated) * self.rate_per_s)
            t.updated = now
        return t

    def _prune(self, now: float) -> None:
        """Forget idle tenants whose buckets are full again (they lose nothing)."""
        for tenant_id, t in list(self._tenants.items()):
            full = self.rate_per_s <= 0 or t.tokens + (now - t.updated) * self.rate_per_s >= (
                self.burst
            )
            if t.inflight == 0 and full:
                del self._tenants[tenant_id]
