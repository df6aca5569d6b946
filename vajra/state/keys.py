"""The Redis key schema: every key Vajra writes, spelled in exactly one place.

All keys live under the prefix ``vajra:``. Code outside this module never formats a key
itself; it calls the function named in the first column. Each prefix has one writer
(convention 9); readers may be anyone.

=================================  ======  ===========  ==============================================  ==========
key (function)                     type    writer       contents                                        TTL
=================================  ======  ===========  ==============================================  ==========
``vajra:tenant:{tenant_id}``       hash    admin/CLI    ``name``, ``created_ms``                        none
(:func:`tenant`)
``vajra:tenant-name:{name}``       string  admin/CLI    the ``tenant_id`` owning ``name`` (uniqueness)  none
(:func:`tenant_name`)
``vajra:tenants``                  set     admin/CLI    every ``tenant_id``                             none
(:func:`tenants`)
``vajra:apikey:{sha256 hex}``      hash    admin/CLI    ``tenant_id``, ``created_ms``, ``key_id``;      none
(:func:`api_key`)                                       the key itself is never stored, only its
                                                        SHA-256 hex digest
``vajra:tenant:{tenant_id}:keys``  set     admin/CLI    SHA-256 hex digests of the tenant's API keys    none
(:func:`tenant_keys`)
``vajra:executor:{executor_id}``   hash    executor     ``incarnation``, ``model``, ``device``,         heartbeat
(:func:`executor`)                                      ``free_memory_bytes``, ``queue_depth``,         TTL (a few
                                                        ``running``, ``resident_adapters`` (JSON list   seconds)
                                                        of adapter ids), ``max_batch_size``,
                                                        ``updated_ms``
``vajra:executors``                set     executor     ``executor_id`` of every executor that has      none (stale
(:func:`executors`)                                     heartbeated; readers drop ids whose             ids pruned
                                                        heartbeat hash has expired                      by readers)
``vajra:usage:{tenant_id}``        hash    ledger       running totals: ``requests``, ``gpu_ms``        none
(:func:`usage`)                                         (float), ``prompt_tokens``,
                                                        ``completion_tokens``
``vajra:tenant-deleted:{id}``      string  admin/CLI    ``"1"``: the tenant was deleted; usage that     dedupe TTL
(:func:`tenant_deleted`)                                arrives late is kept in the stream but never    (days)
                                                        recreates its totals
``vajra:usage:events``             stream  ledger       one entry per billed request: ``event_id``,     none
(:func:`usage_events`)                                  ``tenant_id``, ``request_id``,
                                                        ``executor_id``, ``gpu_ms``,
                                                        ``prompt_tokens``, ``completion_tokens``,
                                                        ``ts_ms``
``vajra:usage:event:{event_id}``   string  ledger       dedupe marker ``"1"``: the event was counted    dedupe TTL
(:func:`usage_event`)                                                                                   (days)
``vajra:predictor:adapter:{id}``   hash    gateway      the predictor's record of requests per          none
(:func:`predictor_adapter`)                             adapter: ``requests``, ``last_ms`` (latest
                                                        request time seen)
``vajra:adapter:{t}:names``        set     registry     the names of tenant ``t``'s adapters            none
(:func:`adapter_names`)
``vajra:adapter:{t}:name:{n}``     hash    registry     adapter ``n`` of tenant ``t``: ``active``       none
(:func:`adapter`)                                       (version), ``last_version`` (versions are
                                                        never reused while the name exists),
                                                        ``created_ms``
``...:name:{n}:versions``          zset    registry     every live version number of adapter ``n``      none
(:func:`adapter_versions`)
``...:name:{n}:v:{version}``       hash    registry     one version: ``version``, ``digest`` (sha256),  none
(:func:`adapter_version`)                               ``object_key``, ``rank``, ``lora_alpha``,
                                                        ``target_modules`` (JSON list),
                                                        ``size_bytes``, ``base_model``, ``created_ms``
``vajra:adapter:{t}:refs``         hash    registry     digest -> how many of ``t``'s versions use      none
(:func:`adapter_refs`)                                  that object (its files are freed at zero)
``vajra:job:{job_id}``             hash    jobs         one training job (:class:`vajra.state.jobs.     none
(:func:`job`)                                           JobRecord`): tenant, adapter, status, lease
                                                        holder, progress, checkpoint, result
``vajra:jobs:{t}:index``           zset    jobs         tenant ``t``'s job ids by ``created_ms``;       none
(:func:`jobs_index`)                                    bounded: the oldest finished ones are dropped
                                                        (with their records) beyond a limit
``vajra:jobs:{t}:active``          set     jobs         tenant ``t``'s queued and running job ids       none
(:func:`jobs_active`)                                   (the per-tenant limit counts these)
``vajra:jobs:queue:{base_model}``  list    jobs         queued job ids for one base model (FIFO;        none
(:func:`jobs_queue`)                                    claims skip ids no longer queued)
``vajra:jobs:running``             zset    jobs         running job id -> lease deadline (ms)           none
(:func:`jobs_running`)
``vajra:jobs:executor:{id}``       set     jobs         the job ids running on one executor             none
(:func:`jobs_executor`)
=================================  ======  ===========  ==============================================  ==========

Times are integer milliseconds since the Unix epoch (``*_ms``); sizes are bytes
(``*_bytes``). Numbers are stored as their decimal text.

Adapter keys (:data:`ADAPTER_PREFIX`) all start with ``vajra:adapter:{tenant_id}:``, so no
lookup by one tenant can touch another's; adapter names (``[A-Za-z0-9_.-]``) cannot contain
``:``, so ``names``/``refs`` and ``name:{n}`` never collide. The registry's Lua scripts build
the version keys from the name key (``<name key>:v:<version>``).

Tenant ids are generated by Vajra (``t_`` followed by hex), so a tenant id can never be
``events`` or ``event:...`` and the ``vajra:usage:`` keys cannot collide.

Deleting a tenant (``ClusterState.tenants.delete``) removes its ``tenant``, ``tenant-name``,
``tenant:{t}:keys`` and ``apikey`` keys, its ``tenants`` membership, ``usage:{t}`` and every
key under :func:`adapter_tenant_prefix`, and its training jobs (records, index, active set,
their queue and lease entries); the ``usage:events`` entries stay (billing history).

Tenant ids start with ``t_``, so ``vajra:jobs:{t}:...`` never collides with
``vajra:jobs:queue:...``, ``vajra:jobs:running`` or ``vajra:jobs:executor:...``.
"""

from __future__ import annotations

PREFIX = "vajra:"
"""Every Vajra key starts with this."""

ADAPTER_PREFIX = PREFIX + "adapter:"
"""Every key of the adapter registry (:mod:`vajra.state.adapters`) starts with this."""


def tenant(tenant_id: str) -> str:
    return f"{PREFIX}tenant:{tenant_id}"


def tenant_name(name: str) -> str:
    return f"{PREFIX}tenant-name:{name}"


def tenants() -> str:
    return f"{PREFIX}tenants"


def api_key(key_sha256_hex: str) -> str:
    return f"{PREFIX}apikey:{key_sha256_hex}"


def tenant_keys(tenant_id: str) -> str:
    return f"{PREFIX}tenant:{tenant_id}:keys"


def executor(executor_id: str) -> str:
    return f"{PREFIX}executor:{executor_id}"


def executors() -> str:
    return f"{PREFIX}executors"


def usage(tenant_id: str) -> str:
    return f"{PREFIX}usage:{tenant_id}"


def tenant_deleted(tenant_id: str) -> str:
    return f"{PREFIX}tenant-deleted:{tenant_id}"


def usage_events() -> str:
    return f"{PREFIX}usage:events"


def usage_event(event_id: str) -> str:
    return f"{PREFIX}usage:event:{event_id}"


def predictor_adapter(adapter: str) -> str:
    return f"{PREFIX}predictor:adapter:{adapter}"


def adapter_tenant_prefix(tenant_id: str) -> str:
    """Every adapter registry key of one tenant starts with this (``vajra:adapter:{t}:``)."""
    return f"{ADAPTER_PREFIX}{tenant_id}:"


def adapter_names(tenant_id: str) -> str:
    return f"{ADAPTER_PREFIX}{tenant_id}:names"


def adapter(tenant_id: str, name: str) -> str:
    return f"{ADAPTER_PREFIX}{tenant_id}:name:{name}"


def adapter_versions(tenant_id: str, name: str) -> str:
    return f"{adapter(tenant_id, name)}:versions"


def adapter_version(tenant_id: str, name: str, version: int) -> str:
    """Built the same way inside the registry's Lua scripts: ``<adapter key>:v:<version>``."""
    return f"{adapter(tenant_id, name)}:v:{version}"


def adapter_refs(tenant_id: str) -> str:
    return f"{ADAPTER_PREFIX}{tenant_id}:refs"


def job(job_id: str) -> str:
    """A training job's record; ``job("")`` is the prefix the job scripts build keys from."""
    return f"{PREFIX}job:{job_id}"


def jobs_index(tenant_id: str) -> str:
    return f"{PREFIX}jobs:{tenant_id}:index"


def jobs_active(tenant_id: str) -> str:
    return f"{PREFIX}jobs:{tenant_id}:active"


def jobs_queue(base_model: str) -> str:
    return f"{PREFIX}jobs:queue:{base_model}"


def jobs_running() -> str:
    return f"{PREFIX}jobs:running"


def jobs_executor(executor_id: str) -> str:
    """The set of jobs running on one executor; ``jobs_executor("")`` is the scripts' prefix."""
    return f"{PREFIX}jobs:executor:{executor_id}"
