"""Billing formulas: what a request's measured GPU time is billed as, and what it costs.

Inference is billed by GPU time (paper, appendix A.2)::

    cost_usd = gpu_ms x gpu_price_per_hour / 3,600,000 x tenancy_factor

where ``tenancy_factor`` is the share of the GPU's price one tenant pays for time it shares
with others in the same batch. Each request's GPU time is billed in whole steps of
``billing_granularity_ms`` (rounded up). The prices are ``[policies]`` in ``config/vajra.toml``.

Pure code: no I/O. The HTTP bridge's usage route and its metrics call these, and so may the
simulator, so what it reports is what the cluster charges.
"""

from __future__ import annotations

import math

#: Milliseconds in an hour: prices are per hour, GPU time is measured in milliseconds.
MS_PER_HOUR = 3_600_000


def billed_gpu_ms(gpu_ms: float, granularity_ms: int) -> float:
    """``gpu_ms`` rounded up to whole steps of ``granularity_ms`` (a step is at least 1 ms).

    No GPU time (zero, negative or NaN) bills nothing.
    """
    if not gpu_ms > 0:
        return 0.0
    step = max(1, granularity_ms)
    return float(max(1, math.ceil(gpu_ms / step)) * step)


def inference_cost_usd(gpu_ms: float, *, gpu_price_per_hour: float, tenancy_factor: float) -> float:
    """What ``gpu_ms`` of shared GPU time costs a tenant, in US dollars."""
    return gpu_ms * gpu_price_per_hour / MS_PER_HOUR * tenancy_factor
