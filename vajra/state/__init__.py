"""Cluster state in Redis/Valkey: tenants, API keys, executor heartbeats, usage.

The key schema is documented in :mod:`vajra.state.keys`. :class:`ClusterState` is the
synchronous client, :class:`AsyncClusterState` its Trio face, and
:class:`EmbeddedValkey` the local server ``vajra up`` starts when no Redis URL is given.
URLs may carry a password: show them through :func:`redact_url` / :func:`redact_secrets`.
"""

from vajra.state import keys
from vajra.state.embedded import EmbeddedValkey
from vajra.state.store import (
    AdapterStats,
    AsyncClusterState,
    ClusterState,
    ExecutorHeartbeat,
    TenantPurge,
    TenantRecord,
    UsageRecord,
    UsageTotals,
    redact_secrets,
    redact_url,
)

__all__ = [
    "AdapterStats",
    "AsyncClusterState",
    "ClusterState",
    "EmbeddedValkey",
    "ExecutorHeartbeat",
    "TenantPurge",
    "TenantRecord",
    "UsageRecord",
    "UsageTotals",
    "keys",
    "redact_secrets",
    "redact_url",
]
