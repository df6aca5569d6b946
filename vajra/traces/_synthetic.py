"""S-LoRA-style synthetic traffic and the token sizes traces without tokens are given.

S-LoRA (Sheng et al., 2023) draws each request's adapter as ``floor(power(alpha) * N)``, where
``power(alpha)`` has density ``alpha * x**(alpha - 1)`` on [0, 1]: small alpha piles traffic on
the first adapters, alpha = 1 spreads it evenly. Arrivals form a gamma process with the given
rate and coefficient of variation (cv = 1 is Poisson; larger cv is burstier).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from vajra.traces._trace import MAX_INT32, Trace, TraceError

# Token sizes: a fixed count, or an inclusive (low, high) range drawn uniformly per request.
TokenSpec = int | tuple[int, int]

# Refuse to build a synthetic trace larger than this many arrivals (about 2.4 GB of arrays).
MAX_SYNTHETIC_ARRIVALS = 120_000_000


def draw_sizes(
    n: int, spec: TokenSpec, rng: np.random.Generator, label: str
) -> npt.NDArray[np.int32]:
    """``n`` token counts from ``spec``; raises :class:`TraceError` naming ``label`` when
    the spec is negative, reversed or beyond int32."""
    if isinstance(spec, bool):
        raise TraceError(f"{label} must be a whole number or a (low, high) pair", column=label)
    if isinstance(spec, int):
        lo = hi = spec
    else:
        try:
            lo, hi = (int(x) for x in spec)
        except (TypeError, ValueError):
            raise TraceError(
                f"{label} must be a whole number or a (low, high) pair", column=label
            ) from None
    if lo < 0 or hi < lo or hi > MAX_INT32:
        raise TraceError(
            f"{label} range ({lo}, {hi}) is not 0 <= low <= high <= 2**31-1", column=label
        )
    if lo == hi:
        return np.full(n, lo, dtype=np.int32)
    return rng.integers(lo, hi + 1, size=n, dtype=np.int64).astype(np.int32)


def synthetic_slora(
    *,
    adapters: int,
    rate_per_s: float,
    cv: float,
    alpha: float,
    duration_s: float,
    seed: int,
    prompt_tokens: TokenSpec = (8, 512),
    output_tokens: TokenSpec = (8, 512),
) -> Trace:
    """Gamma arrivals over ``duration_s`` at ``rate_per_s``, adapters drawn S-LoRA's way.

    Sources are the adapter indices ``"0" .. str(adapters - 1)``; token sizes default to
    S-LoRA's uniform 8..512. Deterministic for a given ``seed``. Raises :class:`TraceError`
    for a non-positive count, rate, cv, alpha or duration, or when the expected number of
    arrivals passes ``MAX_SYNTHETIC_ARRIVALS``.
    """
    if adapters < 1:
        raise TraceError(f"adapters must be >= 1, got {adapters}", column="adapters")
    for label, v in (
        ("rate_per_s", rate_per_s),
        ("cv", cv),
        ("alpha", alpha),
        ("duration_s", duration_s),
    ):
        if not np.isfinite(v) or v <= 0:
            raise TraceError(f"{label} must be finite and > 0, got {v}", column=label)
    expected = rate_per_s * duration_s
    if expected > MAX_SYNTHETIC_ARRIVALS:
        raise TraceError(
            f"{expected:.3g} expected arrivals is above {MAX_SYNTHETIC_ARRIVALS}",
            column="rate_per_s",
        )
    rng = np.random.default_rng(seed)
    shape = 1.0 / (cv * cv)
    scale_ms = 1000.0 / (rate_per_s * shape)  # mean gap = shape * scale = 1000 / rate
    horizon_ms = duration_s * 1000.0
    chunks: list[npt.NDArray[np.float64]] = []
    t0 = 0.0
    # draw gaps in chunks a little larger than the expected count until the horizon is passed
    chunk = int(expected * 1.05 + 6 * np.sqrt(expected) * cv + 64)
    while t0 < horizon_ms:
        gaps = rng.gamma(shape, scale_ms, size=chunk)
        t = t0 + np.cumsum(gaps)
        chunks.append(t)
        t0 = float(t[-1])
        chunk = max(1024, chunk // 4)
    t_ms = np.concatenate(chunks)
    t_ms = t_ms[t_ms < horizon_ms]
    n = t_ms.shape[0]
    drawn = np.asarray(rng.power(alpha, size=n) * adapters).astype(np.int64)
    source = np.minimum(drawn, adapters - 1)
    return Trace(
        t_ms=t_ms,
        source=source.astype(np.int32),
        prompt_tokens=draw_sizes(n, prompt_tokens, rng, "prompt_tokens"),
        output_tokens=draw_sizes(n, output_tokens, rng, "output_tokens"),
        sources=[str(i) for i in range(adapters)],
        name=f"slora-a{alpha:g}-cv{cv:g}-r{rate_per_s:g}",
    )
