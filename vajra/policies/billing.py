"""Billing: what measured usage is billed as, what it costs, and invoices (paper, appendix A.2).

Inference is billed by GPU time, each request rounded up to whole steps of
``billing_granularity_ms`` before the requests are summed::

    inference_cost_usd = sum_i ceil(gpu_ms_i / g) x g  x  gpu_price_per_hour / 3,600,000
                         x tenancy_factor

Fine-tuning is billed by gradients::

    training_cost_usd = sum_j gradients_j x price_per_million_gradients / 1,000,000
                        x gpu_price_per_hour

A *gradient* is one trainable parameter's gradient in one optimizer step, so a step of a job
with ``P`` trainable (LoRA) parameters computes ``P`` gradients (:func:`gradients_per_step`)
and a job of ``S`` optimizer steps computes ``P x S``; micro-batches accumulated into one
optimizer step count once. Both formulas are linear in their sums, so a total is billed from
the summed (integer) billed milliseconds and gradients: the cost of a range of usage does not
depend on how its events were grouped or ordered.

Every figure the ledger stores is an integer (billed milliseconds, gradients, tokens, GPU
microseconds), so totals are exact whatever order the events arrive in.

This module is the only place that does billing arithmetic: the ledger (billed milliseconds
per event), the HTTP bridge (usage route, metrics), the CLI's invoice and the simulator call
it. Pure code: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

#: Milliseconds in an hour: prices are per hour, GPU time is measured in milliseconds.
MS_PER_HOUR = 3_600_000
#: Gradients are priced per million.
GRADIENTS_PER_PRICE_UNIT = 1_000_000
#: Milliseconds in a (UTC) day: usage is aggregated in day buckets.
MS_PER_DAY = 86_400_000
#: The kinds of usage.
KINDS = ("inference", "training")
#: What an invoice can be grouped by (None: one line).
GROUP_BY = ("adapter", "kind", "day")
#: The adapter label of usage of the base model (no adapter).
BASE_LABEL = "(base)"


class PriceConfig(Protocol):
    """The ``[policies]`` keys billing reads (:class:`vajra.config.PoliciesConfig`)."""

    @property
    def billing_granularity_ms(self) -> int: ...
    @property
    def gpu_price_per_hour(self) -> float: ...
    @property
    def tenancy_factor(self) -> float: ...
    @property
    def price_per_million_gradients(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Prices:
    """The prices billing applies (defaults: the paper's)."""

    granularity_ms: int = 10
    gpu_price_per_hour: float = 2.0
    tenancy_factor: float = 0.3
    price_per_million_gradients: float = 0.05

    @classmethod
    def of(cls, cfg: PriceConfig) -> Prices:
        return cls(
            granularity_ms=cfg.billing_granularity_ms,
            gpu_price_per_hour=cfg.gpu_price_per_hour,
            tenancy_factor=cfg.tenancy_factor,
            price_per_million_gradients=cfg.price_per_million_gradients,
        )


def billed_gpu_ms(gpu_ms: float, granularity_ms: int) -> int:
    """``gpu_ms`` rounded up to whole steps of ``granularity_ms`` (a step is at least 1 ms).

    No GPU time (zero, negative, NaN or infinite) bills nothing.
    """
    if not (gpu_ms > 0 and math.isfinite(gpu_ms)):
        return 0
    step = max(1, int(granularity_ms))
    return max(1, math.ceil(gpu_ms / step)) * step


def gpu_us(gpu_ms: float) -> int:
    """Measured GPU time in whole microseconds (rounded to nearest), the unit the ledger sums
    exactly; anything not a finite positive number is 0."""
    if not (gpu_ms > 0 and math.isfinite(gpu_ms)):
        return 0
    return round(gpu_ms * 1000)


def inference_cost_usd(
    billed_ms: float, *, gpu_price_per_hour: float, tenancy_factor: float
) -> float:
    """What ``billed_ms`` of shared GPU time (already rounded, :func:`billed_gpu_ms`) costs."""
    return billed_ms * gpu_price_per_hour / MS_PER_HOUR * tenancy_factor


def inference_cost_of_requests(gpu_ms_each: Iterable[float], prices: Prices) -> float:
    """The paper's inference cost of requests: each rounded up to the granularity, summed,
    then priced."""
    total = sum(billed_gpu_ms(ms, prices.granularity_ms) for ms in gpu_ms_each)
    return inference_cost_usd(
        total, gpu_price_per_hour=prices.gpu_price_per_hour, tenancy_factor=prices.tenancy_factor
    )


def gradients_per_step(trainable_params: int) -> int:
    """Gradients one optimizer step computes: one per trainable parameter (the LoRA A and B
    matrices' entries; the frozen core computes none). Gradient accumulation does not change
    it: the micro-batches of one optimizer step count once. ValueError for a negative or
    non-integer count."""
    if isinstance(trainable_params, bool) or not isinstance(trainable_params, int):
        raise ValueError("trainable_params must be an integer")
    if trainable_params < 0:
        raise ValueError("trainable_params must be non-negative")
    return trainable_params


def training_cost_usd(
    gradients: int, *, price_per_million_gradients: float, gpu_price_per_hour: float
) -> float:
    """The paper's training cost of ``gradients`` (summed over steps)."""
    return gradients * price_per_million_gradients / GRADIENTS_PER_PRICE_UNIT * gpu_price_per_hour


def cost_usd(billed_ms: int, gradients: int, prices: Prices) -> float:
    """Inference cost of ``billed_ms`` plus training cost of ``gradients``."""
    inference = inference_cost_usd(
        billed_ms,
        gpu_price_per_hour=prices.gpu_price_per_hour,
        tenancy_factor=prices.tenancy_factor,
    )
    training = training_cost_usd(
        gradients,
        price_per_million_gradients=prices.price_per_million_gradients,
        gpu_price_per_hour=prices.gpu_price_per_hour,
    )
    return inference + training


def day_of(ts_ms: int) -> int:
    """The UTC day (days since the Unix epoch) holding ``ts_ms``: the ledger's bucket."""
    return ts_ms // MS_PER_DAY


def day_label(day: int) -> str:
    """``YYYY-MM-DD`` of a :func:`day_of` day."""
    return datetime.fromtimestamp(day * (MS_PER_DAY // 1000), UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Usage of one (day, adapter, version, kind) bucket of one tenant, as the ledger keeps it.

    ``adapter`` is the adapter's name ("" for the base model); ``billed_ms`` is inference time
    already rounded per request (0 for training, which is billed by ``gradients``).
    """

    day: int
    adapter: str
    adapter_version: int
    kind: str
    events: int = 0
    gpu_us: int = 0
    billed_ms: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gradients: int = 0


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """One line of an invoice: the rows sharing ``label``, summed, and what they cost."""

    label: str
    events: int
    gpu_ms: float
    billed_ms: int
    prompt_tokens: int
    completion_tokens: int
    gradients: int
    inference_cost_usd: float
    training_cost_usd: float

    @property
    def cost_usd(self) -> float:
        return self.inference_cost_usd + self.training_cost_usd


@dataclass(frozen=True, slots=True)
class Invoice:
    """An invoice: its lines (ordered by label) and their total."""

    group_by: str | None
    lines: list[InvoiceLine] = field(default_factory=list)
    total: InvoiceLine | None = None


def row_label(row: UsageRow, group_by: str | None) -> str:
    """The invoice line ``row`` belongs to under ``group_by``."""
    if group_by is None:
        return "total"
    if group_by == "adapter":
        return f"{row.adapter}@{row.adapter_version}" if row.adapter else BASE_LABEL
    if group_by == "kind":
        return row.kind
    if group_by == "day":
        return day_label(row.day)
    raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)} or None")


def _line(label: str, rows: list[UsageRow], prices: Prices) -> InvoiceLine:
    billed = sum(r.billed_ms for r in rows if r.kind == "inference")
    gradients = sum(r.gradients for r in rows if r.kind == "training")
    return InvoiceLine(
        label=label,
        events=sum(r.events for r in rows),
        gpu_ms=sum(r.gpu_us for r in rows) / 1000,
        billed_ms=billed,
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        gradients=gradients,
        inference_cost_usd=inference_cost_usd(
            billed,
            gpu_price_per_hour=prices.gpu_price_per_hour,
            tenancy_factor=prices.tenancy_factor,
        ),
        training_cost_usd=training_cost_usd(
            gradients,
            price_per_million_gradients=prices.price_per_million_gradients,
            gpu_price_per_hour=prices.gpu_price_per_hour,
        ),
    )


def invoice(rows: Iterable[UsageRow], group_by: str | None, prices: Prices) -> Invoice:
    """Group ``rows`` by ``group_by`` (``adapter``, ``kind``, ``day`` or None for one line),
    sum each group and price it; the total is priced from the summed rows, not by adding the
    lines' costs (the formulas are linear, so the two agree up to float rounding).

    ValueError for an unknown ``group_by``.
    """
    if group_by is not None and group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)} or None")
    all_rows = list(rows)
    groups: dict[str, list[UsageRow]] = {}
    for row in all_rows:
        groups.setdefault(row_label(row, group_by), []).append(row)
    lines = [_line(label, groups[label], prices) for label in sorted(groups)]
    return Invoice(group_by, lines, _line("total", all_rows, prices))
