"""Cluster state in Redis/Valkey: tenants, keys, heartbeats, usage, predictor data, adapters, jobs.

The only package that talks to Redis. :class:`ClusterState` holds one synchronous owner per
group of keys (``.tenants``, ``.api_keys``, ``.heartbeats``, ``.usage``, ``.events``,
``.adapters``, ``.jobs``) over one connection (:mod:`vajra.state.connection`); Trio code runs their
methods through an :class:`OffLoop`. The key schema is documented in :mod:`vajra.state.keys`;
:class:`EmbeddedValkey` is the local server ``vajra up`` starts when no Redis URL is given.
URLs may carry a password: show them through :func:`redact_url` / :func:`redact_secrets`.
"""

from vajra.state import keys
from vajra.state.cluster import ClusterState
from vajra.state.connection import redact_secrets, redact_url
from vajra.state.embedded import EmbeddedValkey
from vajra.state.heartbeats import ExecutorHeartbeat
from vajra.state.jobs import JobRecord, JobStatus
from vajra.state.offloop import OffLoop
from vajra.state.request_events import AdapterStats
from vajra.state.tenant_purge import TenantPurge
from vajra.state.tenants import TenantRecord
from vajra.state.usage import UsageRecord, UsageTotals

__all__ = [
    "AdapterStats",
    "ClusterState",
    "EmbeddedValkey",
    "ExecutorHeartbeat",
    "JobRecord",
    "JobStatus",
    "OffLoop",
    "TenantPurge",
    "TenantRecord",
    "UsageRecord",
    "UsageTotals",
    "keys",
    "redact_secrets",
    "redact_url",
]
