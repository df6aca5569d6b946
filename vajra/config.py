"""Configuration: one frozen dataclass per actor, loaded from TOML, overridden by environment.

Precedence, lowest first: the dataclass defaults below (they follow the paper's system
parameters) → a TOML file (``--config FILE``; ``config/vajra.toml`` lists every key) →
environment variables ``VAJRA_<SECTION>_<KEY>`` (for example ``VAJRA_EXECUTOR_MAX_BATCH_SIZE=8``).
Two variables are spelled without a section because operators expect them:
``VAJRA_HOME`` (→ ``cluster.home``) and ``VAJRA_REDIS_URL`` (→ ``cluster.redis_url``).

An unknown section or key, or a value of the wrong type, raises :class:`ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file or variable that cannot be used; the message names it."""


@dataclass(frozen=True)
class ClusterConfig:
    home: str = "~/.vajra"
    redis_url: str = ""
    model: str = ""
    executors: int = 1
    gateway_address: str = "tcp://127.0.0.1:5555"
    gateway_backend_address: str = "tcp://127.0.0.1:5556"
    scheduler_address: str = "tcp://127.0.0.1:5557"
    scheduler_dispatch_address: str = "tcp://127.0.0.1:5558"
    events_address: str = "tcp://127.0.0.1:5559"
    ledger_address: str = "tcp://127.0.0.1:5560"
    metrics_port: int = 0  # > 0: `vajra up` gives each actor a /metrics port from here up
    # GPU indices `vajra up` hands its executors round-robin ("0,1"); empty: every visible GPU
    # when executor.device is "auto" (the CPU without CUDA).
    devices: str = ""

    @property
    def home_path(self) -> Path:
        return Path(os.path.expanduser(self.home))


@dataclass(frozen=True)
class BusConfig:
    rpc_timeout_s: float = 5.0
    max_body_bytes: int = 1 << 20
    high_water_mark: int = 10_000
    recv_batch: int = 256


@dataclass(frozen=True)
class GatewayConfig:
    max_prompt_chars: int = 32_768
    max_tokens_limit: int = 4_096
    max_stop_strings: int = 8
    max_stop_chars: int = 128
    max_deadline_ms: int = 600_000
    max_inflight: int = 4_096
    auth_cache_ttl_s: float = 1.0
    auth_negative_ttl_s: float = 0.5  # how long a key that belongs to no tenant stays refused
    auth_cache_entries: int = 100_000  # least recently refreshed out beyond this
    max_pending_auth: int = 1_024  # key lookups in flight; beyond: `overloaded` at once
    max_pending_auth_per_client: int = 64  # ... per client connection
    # Per tenant, per gateway (N gateways: configure 1/N each); <= 0 turns a limit off.
    tenant_rate_limit_per_s: float = 500.0  # requests of any kind, refilled per second
    tenant_rate_limit_burst: int = 1_000
    tenant_max_inflight: int = 512  # generations in flight at once
    gateway_id: str = "gw-0"


@dataclass(frozen=True)
class SchedulerConfig:
    executor_timeout_s: float = 1.5
    affinity_window: int = 16  # recent placements of a tenant's adapter that affinity reads
    affinity_ttl_ms: int = 60_000  # ... and how long one counts
    no_capacity_wait_ms: int = 2_000  # a request no executor has room for waits this long


@dataclass(frozen=True)
class ProvisioningConfig:
    local_executor_start: bool = False  # vajra up starts executors on demand (up to the max)
    max_executors: int = 4  # executors serving at most, counting those vajra up starts
    executor_start_s: float = 60.0  # how long a start may take; held requests wait this long
    idle_stop_s: float = 120.0  # an executor started on demand stops after this long idle


@dataclass(frozen=True)
class PredictorConfig:
    history_per_adapter: int = 256
    flush_interval_s: float = 1.0
    kind: str = "histogram"  # histogram | gap | ewma | lstm | keepalive | lru
    keepalive_ms: int = 600_000  # keepalive; the histogram's fallback
    plan_interval_s: float = 0.25  # how often tier commands are planned
    lstm_bin_ms: int = 1_000


@dataclass(frozen=True)
class LedgerConfig:
    flush_timeout_s: float = 3.0
    usage_stream_maxlen: int = 1_000_000  # usage stream entries kept (trimmed, approximately)


@dataclass(frozen=True)
class ExecutorConfig:
    device: str = "auto"
    dtype: str = "auto"
    torch_threads: int = 0  # torch's CPU threads; 0: on the CPU, its cores less one
    max_batch_size: int = 32
    max_model_len: int = 2_048
    max_batch_tokens: int = 2_048  # tokens in one packed step: decode tokens + prefill chunks
    kv_cache_bytes: int = (
        0  # paged KV cache; 0: kv_memory_fraction of free GPU memory / CPU default
    )
    kv_memory_fraction: float = 0.9
    kv_block_size: int = 16  # token positions per KV block
    decode_graphs: str = "auto"  # auto | eager | off: CUDA graphs of decode steps
    fused_layers: bool = True  # fused norms, rotary, activation, merged projections on CUDA
    max_queue: int = 256
    load_report_interval_s: float = 0.1
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    drain_timeout_s: float = 5.0
    usage_resend_s: float = 2.0
    max_usage_outbox: int = 100_000  # unacknowledged usage events; beyond: refuse new work
    usage_journal_dir: str = ""  # empty: <cluster.home>/usage (one directory per executor id)
    keep_usage_journals: bool = False  # keep finished journal segments (*.jsonl.done)


@dataclass(frozen=True)
class AdaptersConfig:
    max_vram_adapters: int = 100
    lru_eviction_threshold: float = 0.9
    max_rank: int = 64
    max_adapter_bytes: int = 268_435_456  # config + weights of one upload (256 MiB)
    max_concurrent_pushes: int = 4  # uploads validated/stored at once per gateway
    max_adapters_per_tenant: int = 1_000  # adapter names a tenant may hold (0: no limit)
    max_versions_per_adapter: int = 1_000  # versions one name may hold (0: no limit)
    resolve_cache_ttl_s: float = 1.0  # gateway's NAME[@VERSION] -> version cache
    swap_warm_timeout_s: float = 10.0  # hot swap: wait this long for executors to warm
    cache_dir: str = ""  # executor's disk tier; empty: <cluster.home>/cache/adapters
    disk_cache_bytes: int = 10 * 2**30
    host_cache_bytes: int = 1 * 2**30  # allocated (pinned, on CUDA) once at executor start


@dataclass(frozen=True)
class StorageConfig:
    """The object store holding adapter files: a local directory, or S3.

    ``local_dir`` empty means ``<cluster.home>/objects``. Empty S3 credentials fall back to
    the standard AWS chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, profiles).
    """

    kind: str = "local"  # "local" | "s3"
    local_dir: str = ""
    s3_endpoint: str = ""  # empty: AWS's own endpoint for the region
    s3_bucket: str = "vajra"
    s3_region: str = "us-east-1"
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    s3_connect_timeout_s: float = 2.0
    s3_read_timeout_s: float = 10.0
    s3_op_timeout_s: float = 60.0  # one whole put/get/delete, retries included
    s3_max_attempts: int = 2


@dataclass(frozen=True)
class PoliciesConfig:
    prefetch_lookahead_ms: int = 5_000
    billing_granularity_ms: int = 10
    training_preemption_enabled: bool = True
    placement_alpha: float = 0.5
    placement_beta: float = 0.3
    placement_gamma: float = 0.2
    gpu_price_per_hour: float = 2.00
    tenancy_factor: float = 0.3
    price_per_million_gradients: float = 0.05


@dataclass(frozen=True)
class TrainingConfig:
    """Fine-tuning jobs (issue 12): what the gateway accepts, how executors run them."""

    max_dataset_bytes: int = 16_777_216  # one dataset (JSON Lines), uploaded or in S3
    max_examples: int = 100_000  # lines of one dataset
    max_jobs_per_tenant: int = 4  # queued + running at once (0: no limit)
    max_jobs_per_executor: int = 1  # jobs one executor trains at once
    placement_wait_s: float = 2.0  # a job not claimed by placement's offer by then: any executor
    max_jobs_listed: int = 1_000  # jobs kept in a tenant's index (oldest finished dropped)
    lease_ms: int = 30_000  # an executor renews its claim on a job within this
    expire_interval_s: float = 2.0  # how often the gateway fails jobs whose lease passed
    checkpoint_every: int = 50  # optimizer steps between checkpoints, when a job names none
    inference_ratio: int = 10  # inference steps per training micro-step when both wait
    progress_poll_s: float = 0.5  # how often a followed job's record is read
    max_follow_s: float = 86_400.0  # a progress stream ends after this long
    max_concurrent_submits: int = 2  # datasets parsed/tokenized at once per gateway
    max_epochs: int = 100
    max_steps: int = 100_000
    max_batch_size: int = 64
    max_grad_accum_steps: int = 64
    max_micro_tokens: int = 8_192
    max_learning_rate: float = 0.01
    max_target_modules: int = 16


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP bridge (``vajra actor http``; ``vajra up`` starts it when ``enabled``)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    admin_key: str = ""
    base_model_name: str = ""
    gateway_connections: int = 2
    request_timeout_s: float = 60.0
    max_body_bytes: int = 1_048_576
    # Slow clients: a request's headers (and an idle keep-alive connection) get this long;
    # a request body must arrive whole within body_timeout_s.
    idle_timeout_s: float = 15.0
    body_timeout_s: float = 60.0
    health_interval_s: float = 0.5
    health_timeout_s: float = 1.5
    graceful_timeout_s: float = 3.0


@dataclass(frozen=True)
class VajraConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    provisioning: ProvisioningConfig = field(default_factory=ProvisioningConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    policies: PoliciesConfig = field(default_factory=PoliciesConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    def replace(self, section: str, **values: Any) -> VajraConfig:
        """A copy with some keys of one section changed (validated like file values)."""
        current = getattr(self, section)
        hints = typing.get_type_hints(type(current))
        parsed = {k: _coerce(hints[k], v, f"{section}.{k}") for k, v in values.items()}
        return dataclasses.replace(self, **{section: dataclasses.replace(current, **parsed)})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


_SECTIONS: dict[str, type[Any]] = {
    f.name: typing.get_type_hints(VajraConfig)[f.name] for f in dataclasses.fields(VajraConfig)
}
_SHORT_ENV = {"VAJRA_HOME": ("cluster", "home"), "VAJRA_REDIS_URL": ("cluster", "redis_url")}


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check (and, for strings from the environment, parse) one value against its type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(args[0], value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        ):
            return value.lower() in ("1", "true", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _apply(base: VajraConfig, section: str, values: Mapping[str, Any], origin: str) -> VajraConfig:
    if section not in _SECTIONS:
        raise ConfigError(f"{origin}: unknown section [{section}] (known: {', '.join(_SECTIONS)})")
    hints = typing.get_type_hints(_SECTIONS[section])
    for key in values:
        if key not in hints:
            raise ConfigError(f"{origin}: unknown key {section}.{key}")
    parsed = {k: _coerce(hints[k], v, f"{origin}: {section}.{k}") for k, v in values.items()}
    current = getattr(base, section)
    return dataclasses.replace(base, **{section: dataclasses.replace(current, **parsed)})


def load_config(
    path: str | Path | None = None, env: Mapping[str, str] | None = None
) -> VajraConfig:
    """Load the effective configuration: defaults, then ``path`` (if any), then ``env``."""
    env = os.environ if env is None else env
    cfg = VajraConfig()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{p}: top-level key {section!r} must be a [section]")
            cfg = _apply(cfg, section, values, str(p))
    for name, (section, key) in _SHORT_ENV.items():
        if name in env:
            cfg = _apply(cfg, section, {key: env[name]}, f"${name}")
    for name, value in env.items():
        if not name.startswith("VAJRA_") or name in _SHORT_ENV:
            continue
        rest = name[len("VAJRA_") :].lower()
        section, _, key = rest.partition("_")
        if section in _SECTIONS and key:
            cfg = _apply(cfg, section, {key: value}, f"${name}")
    return cfg


def dump_toml(cfg: VajraConfig) -> str:
    """Render a configuration as TOML (``vajra config show``; the supervisor's runtime file)."""
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
