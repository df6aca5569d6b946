"""The simulator's configuration: one frozen dataclass per TOML section of ``simulations/configs/``.

A config names the trace, the cluster (executors, tier capacities and load bandwidths), the
execution costs (per token and per batch, from the file or from ``vajra bench`` JSON), the
policies (placement, prefetch) and the prices. Defaults for the placement weights, the prefetch
lookahead and the prices are the cluster's own (``vajra.config.PoliciesConfig``), so a simulation
that sets nothing runs what the cluster runs.

Errors: an unknown section or key, a value of the wrong type or out of range raises
:class:`SimConfigError` naming the section and key; nothing is half-loaded.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vajra.config import PoliciesConfig

_POLICIES = PoliciesConfig()
MB = 1 << 20
GB = 1 << 30


class SimConfigError(ValueError):
    """A simulation config that cannot run: the message names the section and the key."""


@dataclass(frozen=True)
class RunSection:
    name: str = "simulation"
    seed: int = 0
    sample_every_ms: float = 60_000.0  # how often tenants per GPU and queue depth are sampled
    max_wait_ms: float = (
        30_000.0  # a request no executor can take waits this long, then no_capacity
    )
    retry_every_ms: float = 250.0  # how often a waiting request asks placement again
    cold_breakdown: int = 0  # 1: report cold starts by gap since the adapter's last request


@dataclass(frozen=True)
class TraceSection:
    kind: str = "synthetic-slora"  # "synthetic-slora" | "file"
    format: str = ""  # vajra.traces.load_trace format, for kind = "file"
    path: str = ""  # "bundled:NAME" (vajra.traces.bundled) or a path relative to the config file
    adapters: int = 100  # adapters the trace's sources are mapped onto
    mapping: str = "one-to-one"  # "one-to-one" | "striped"
    time_scale: float = 1.0  # Trace.scaled(time=...): 0.1 compresses time tenfold
    rate_scale: float = 1.0  # Trace.scaled(rate=...): thins or duplicates arrivals
    start_s: float = 0.0
    duration_s: float = 0.0  # 0: the whole trace
    # the first warmup_s seconds of the cut (from start_s) drive the policies and the tiers but
    # are left out of every reported figure (predictor history, warm tiers)
    warmup_s: float = 0.0
    max_requests: int = 0  # 0: no limit (Trace.head)
    # synthetic-slora
    rate_per_s: float = 10.0
    cv: float = 1.0
    alpha: float = 1.0
    prompt_tokens: int = 128
    output_tokens: int = 64
    # tenants owning the adapters: 0, each adapter its own tenant; N, adapter a is tenant a % N's
    # (`vajra replay` pushes every adapter under its key's one tenant: 1)
    tenants: int = 0
    # a file trace with no token counts (Azure Functions) gets these
    default_prompt_tokens: int = 128
    default_output_tokens: int = 64


@dataclass(frozen=True)
class ClusterSection:
    executors: int = 2
    base_model: str = "base"
    max_batch_size: int = 32
    max_queue: int = 256
    gpu_slots: int = 100  # adapters resident in GPU memory at once (paper: MAX_VRAM_ADAPTERS)
    host_bytes: int = 8 * GB  # pinned host memory for adapters
    disk_bytes: int = 64 * GB  # local NVMe cache
    adapter_bytes: int = 100 * MB  # every adapter's size (paper: ~0.1 GB)
    # load into GPU memory from each tier: ms = bytes / (gbps x 1e9 / 1e3) + latency_ms
    host_gbps: float = 25.0
    host_latency_ms: float = 2.0
    disk_gbps: float = 5.0
    disk_latency_ms: float = 5.0
    remote_gbps: float = 1.0
    remote_latency_ms: float = 50.0
    bench_adapters_json: str = (
        ""  # a `vajra bench adapters` JSON: host and disk times measured there
    )
    # ProvisionNewGPU: when no executor has room, start another (one at a time) until this
    # many serve; 0 (or <= executors): the cluster stays at `executors`
    max_executors: int = 0
    executor_start_ms: float = 30_000.0  # a started GPU joins this long after it was asked for
    idle_stop_ms: float = 0.0  # a started GPU leaves after this long with no request (0: never)


@dataclass(frozen=True)
class CostSection:
    """Execution time of a request at batch size b (continuous batching at request granularity):
    ttft = serving_ms + load wait + (prefill_ms_base + prefill_ms_per_token x prompt) x f;
    each further token costs (decode_ms_base + decode_ms_per_seq x b) x f,
    f = adapter_compute_factor."""

    prefill_ms_base: float = 5.0
    prefill_ms_per_token: float = 0.05
    decode_ms_base: float = 10.0
    decode_ms_per_seq: float = 0.2
    bench_engine_json: str = ""  # a `vajra bench engine` JSON: the four costs are fitted from it
    # prefill and decode times of a request with an adapter are multiplied by this (every
    # simulated request has one); bench_engine_json's g_adapters sets it when it has that section
    adapter_compute_factor: float = 1.0
    # client -> gateway -> scheduler -> executor and the stream back, outside the engine: added
    # to every request's TTFT and end-to-end latency, not to GPU time
    serving_ms: float = 0.0
    # a `vajra bench serving` JSON (requests back to back) or a `vajra bench paced` one
    # (requests one at a time with idle gaps, as a sparse trace sends them): serving_ms is
    # measured there
    bench_serving_json: str = ""


@dataclass(frozen=True)
class HostSection:
    """The machine every process of the cluster shares, for a cluster whose executors compute
    on the CPU (the tiny model here); see :mod:`simulations.host`. ``cores`` = 0: no contention
    (executors on GPUs of their own). ``costs.bench_serving_json`` naming a ``vajra bench
    paced`` JSON sets ``serving_cpu_ms`` and ``background_cores`` from what it measured."""

    cores: int = 0
    # CPU per request spent outside the executors: gateway, scheduler, predictor, ledger,
    # Valkey and the client that sends it
    serving_cpu_ms: float = 0.0
    background_cores: float = 0.0  # what the cluster's processes use while idle, in cores


@dataclass(frozen=True)
class PolicySection:
    placement: str = "vajra"  # "vajra" (Algorithm 2) | "least-loaded" | "random"
    # "none" (reactive LRU) | "ewma" | "histogram" | "gap" | "lstm" | "keepalive" | "oracle"
    # (knows each seen adapter's true next arrival: the ceiling of a perfect predictor)
    prefetch: str = "none"
    keepalive_ms: float = 600_000.0  # for prefetch = "keepalive"
    lookahead_ms: float = float(_POLICIES.prefetch_lookahead_ms)
    tick_ms: float = 1_000.0  # how often the prefetcher plans
    # Prefetcher(stage_overdue=...): 1 stages an adapter expected "any moment" (a keep-alive
    # window) in host memory; 0 keeps it in GPU memory (serverless keep-alive, held warm)
    stage_overdue: int = 1
    min_idle_ms: float = 0.0  # Prefetcher(min_idle_ms=...): demote after this idle; 0: lookahead
    # GPU victims when a predictor runs: "lru", or "predicted" (the idle adapter predicted
    # farthest away leaves; a prefetch that would push out one needed sooner is declined)
    eviction: str = "lru"
    gap_quantile: float = 0.5  # prefetch = "gap": forecast this quantile of the longer idle times
    gap_resolution_ms: float = 0.0  # prefetch = "gap": > 0 counts arrivals per slot (a minute)
    oracle_resolution_ms: float = 0.0  # prefetch = "oracle": > 0 knows only the slot's start
    alpha: float = _POLICIES.placement_alpha
    beta: float = _POLICIES.placement_beta
    gamma: float = _POLICIES.placement_gamma
    # Algorithm 2's index gets an executor's state again when its load (running + queued) or its
    # adapters in use cross a multiple of this many, or its eligibility changes; 1: every change.
    load_step: int = 1


@dataclass(frozen=True)
class EconomicsSection:
    gpu_price_per_hour: float = _POLICIES.gpu_price_per_hour
    tenancy_factor: float = _POLICIES.tenancy_factor
    billing_granularity_ms: int = _POLICIES.billing_granularity_ms
    serverless_keepalive_ms: float = 600_000.0  # the fixed keep-alive serverless baseline
    serverless_cold_start_ms: float = 3_200.0  # whole 7B model load (paper, table 3)


@dataclass(frozen=True)
class SimConfig:
    run: RunSection = field(default_factory=RunSection)
    trace: TraceSection = field(default_factory=TraceSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    costs: CostSection = field(default_factory=CostSection)
    host: HostSection = field(default_factory=HostSection)
    policy: PolicySection = field(default_factory=PolicySection)
    economics: EconomicsSection = field(default_factory=EconomicsSection)
    base_dir: Path = Path(".")  # relative paths in the config resolve against its directory

    def resolve(self, path: str) -> Path:
        """``path`` as written in the config, relative to the config file's directory."""
        p = Path(path)
        return p if p.is_absolute() else self.base_dir / p


_CHOICES = {
    ("trace", "kind"): {"synthetic-slora", "file"},
    ("trace", "mapping"): {"one-to-one", "striped"},
    ("policy", "placement"): {"vajra", "least-loaded", "random"},
    ("policy", "prefetch"): {"none", "ewma", "histogram", "gap", "lstm", "keepalive", "oracle"},
    ("policy", "eviction"): {"lru", "predicted"},
}
# Zero would divide by zero or stall the simulation; every other number may be zero, none negative.
_POSITIVE = {
    "sample_every_ms", "retry_every_ms", "adapters", "time_scale", "rate_scale", "rate_per_s",
    "cv", "prompt_tokens", "output_tokens", "default_prompt_tokens", "default_output_tokens",
    "executors", "max_batch_size", "gpu_slots", "adapter_bytes", "host_gbps", "disk_gbps",
    "remote_gbps", "tick_ms", "load_step", "keepalive_ms", "billing_granularity_ms",
    "adapter_compute_factor",
}  # fmt: skip


def _coerce(section: str, key: str, default: Any, value: Any) -> Any:
    where = f"[{section}] {key}"
    if isinstance(default, bool) or isinstance(value, bool):
        raise SimConfigError(f"{where}: booleans are not accepted here")
    if isinstance(default, str):
        if not isinstance(value, str):
            raise SimConfigError(f"{where}: expected a string, got {value!r}")
        choices = _CHOICES.get((section, key))
        if choices is not None and value not in choices:
            raise SimConfigError(f"{where}: {value!r} is not one of {sorted(choices)}")
        return value
    if isinstance(default, int):
        if not isinstance(value, int):
            raise SimConfigError(f"{where}: expected an integer, got {value!r}")
    elif isinstance(default, float):
        if not isinstance(value, int | float):
            raise SimConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise SimConfigError(f"{where}: {value!r} is not a finite number")
    if value < 0 or (value == 0 and key in _POSITIVE):
        raise SimConfigError(
            f"{where}: {value!r} must be {'positive' if key in _POSITIVE else '>= 0'}"
        )
    return value


def _section(cls: type[Any], section: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise SimConfigError(f"[{section}]: expected a table")
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SimConfigError(f"[{section}]: unknown keys {unknown}")
    coerced = {k: _coerce(section, k, getattr(defaults, k), v) for k, v in values.items()}
    return cls(**coerced)


_SECTIONS: dict[str, type[Any]] = {
    "run": RunSection,
    "trace": TraceSection,
    "cluster": ClusterSection,
    "costs": CostSection,
    "host": HostSection,
    "policy": PolicySection,
    "economics": EconomicsSection,
}


def parse_config(data: dict[str, Any], *, base_dir: Path = Path(".")) -> SimConfig:
    """A :class:`SimConfig` from parsed TOML; raises :class:`SimConfigError` on any bad entry."""
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise SimConfigError(f"unknown sections {unknown}; known: {sorted(_SECTIONS)}")
    sections = {name: _section(cls, name, data.get(name, {})) for name, cls in _SECTIONS.items()}
    cfg = SimConfig(**sections, base_dir=base_dir)
    if cfg.trace.kind == "file" and not (cfg.trace.format and cfg.trace.path):
        raise SimConfigError("[trace]: kind = 'file' needs format and path")
    if cfg.trace.warmup_s > 0 and 0 < cfg.trace.duration_s <= cfg.trace.warmup_s:
        raise SimConfigError("[trace] warmup_s: must be shorter than duration_s")
    if cfg.cluster.executors < 1 or cfg.cluster.gpu_slots < 1 or cfg.cluster.max_batch_size < 1:
        raise SimConfigError("[cluster]: executors, gpu_slots and max_batch_size must be >= 1")
    return cfg


def load_config(path: str | Path, **overrides: Any) -> SimConfig:
    """Read a TOML config; ``overrides`` maps ``"section.key"`` to a value (for sweeps and tests).

    Raises :class:`SimConfigError` for a missing file, bad TOML or a bad entry.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise SimConfigError(f"cannot read {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise SimConfigError(f"{path}: {e}") from e
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        data.setdefault(section, {})[key] = value
    return parse_config(data, base_dir=path.parent)
