"""The trace a simulation replays, built from ``[trace]`` with :mod:`vajra.traces` unchanged.

A file trace is loaded (``bundled:NAME`` names a sample shipped in the package), cut to
``start_s`` + ``duration_s``, scaled in time and rate, cut to ``max_requests``, and its sources
(functions, apps) are mapped onto ``adapters`` adapters. A synthetic trace is S-LoRA's: adapter
index = floor(power(alpha) x adapters), gamma arrivals at ``rate_per_s`` with ``cv``.

Errors: :class:`vajra.traces.TraceError` (row and column named) for bad input files; a
:class:`simulations.config.SimConfigError` for a config that asks for a trace that cannot exist.
"""

from __future__ import annotations

from pathlib import Path

from simulations.config import SimConfig, SimConfigError
from vajra.traces import Trace, bundled, load_trace, map_to_adapters, synthetic_slora


def trace_path(cfg: SimConfig) -> Path:
    """Where the config's trace lives: a bundled sample or a path relative to the config."""
    path = cfg.trace.path
    if path.startswith("bundled:"):
        return bundled(path.removeprefix("bundled:"))
    return cfg.resolve(path)


def build_trace(cfg: SimConfig) -> Trace:
    """The adapter-indexed trace the engine replays (sources are ``"0"..str(adapters-1)``)."""
    t = cfg.trace
    if t.kind == "synthetic-slora":
        if t.duration_s <= 0:
            raise SimConfigError("[trace] duration_s: a synthetic trace needs a duration")
        trace = synthetic_slora(
            adapters=t.adapters,
            rate_per_s=t.rate_per_s,
            cv=t.cv,
            alpha=t.alpha,
            duration_s=t.duration_s,
            seed=cfg.run.seed,
            prompt_tokens=t.prompt_tokens,
            output_tokens=t.output_tokens,
        )
    else:
        opts: dict[str, object] = {}
        if t.format.startswith("azure-functions"):
            opts = {
                "seed": cfg.run.seed,
                "prompt_tokens": t.default_prompt_tokens,
                "output_tokens": t.default_output_tokens,
            }
        trace = load_trace(trace_path(cfg), t.format, **opts)
        if t.start_s > 0 or t.duration_s > 0:
            end_ms = (t.start_s + t.duration_s) * 1000.0 if t.duration_s > 0 else float("inf")
            trace = trace.slice(t.start_s * 1000.0, end_ms).rebased()
        trace = map_to_adapters(trace, t.adapters, mode=t.mapping)  # type: ignore[arg-type]
    if t.time_scale != 1.0 or t.rate_scale != 1.0:
        trace = trace.scaled(time=t.time_scale, rate=t.rate_scale, seed=cfg.run.seed)
    if t.max_requests > 0 and len(trace) > t.max_requests:
        trace = trace.head(t.max_requests)
    return trace
