"""Cluster state in Redis/Valkey: tenants, API keys, executor heartbeats, usage.

The key schema is documented in :mod:`vajra.state.keys`. :class:`ClusterState` is the
synchronous client, :class:`AsyncClusterState` its Trio face, and
:class:`EmbeddedValkey` the local server ``vajra up`` starts when no Redis URL is given.
"""

from vajra.state import keys
from vajra.state.embedded import EmbeddedValkey
from vajra.state.store import (
    AdapterStats,
    AsyncClusterState,
    ClusterState,
    ExecutorHeartbeat,
    TenantRecord,
    UsageRecord,
    UsageTotals,
)

__all__ = [
    "AdapterStats",
    "AsyncClusterState",
    "ClusterState",
    "EmbeddedValkey",
    "ExecutorHeartbeat",
    "TenantRecord",
    "UsageRecord",
    "UsageTotals",
    "keys",
]
