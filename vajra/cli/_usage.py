"""``vajra usage``: a tenant's usage over a range of days, as an invoice.

``vajra usage --key K [--tenant T] [--from WHEN] [--to WHEN] [--by adapter|kind|day] [--csv]``
asks the gateway (the SDK's ``usage``) and prints one line per group, then the total, with the
costs of :mod:`vajra.policies.billing` at the cluster's prices (``[policies]``). ``WHEN`` is
Unix milliseconds or an ISO 8601 date/time (UTC when it names no zone); the UTC days that
overlap ``[from, to)`` are counted. ``--csv`` writes the same lines as CSV to stdout.
"""

from __future__ import annotations

import argparse
import csv
import sys
from typing import TYPE_CHECKING, TextIO

from vajra.cli._common import (
    api_key,
    cluster_config,
    gateway_address,
    load_args_config,
    with_config,
)
from vajra.policies.billing import GROUP_BY, Invoice, InvoiceLine, Prices

if TYPE_CHECKING:
    from vajra.cli._common import Subcommands

#: The invoice's column headers (CSV and table).
COLUMNS = (
    "group",
    "events",
    "gpu_ms",
    "billed_ms",
    "prompt_tokens",
    "completion_tokens",
    "gradients",
    "inference_usd",
    "training_usd",
    "cost_usd",
)


def register(sub: Subcommands) -> None:
    p = with_config(sub.add_parser("usage", help="a tenant's usage and its cost, as an invoice"))
    p.add_argument("--gateway", help="gateway address (default: the running cluster's)")
    p.add_argument(
        "--key", help="API key (default: $VAJRA_API_KEY); the admin key may name --tenant"
    )
    p.add_argument("--tenant", help="tenant id or name (default: the key's own)")
    p.add_argument("--from", dest="start", help="first instant: Unix ms or ISO 8601 (UTC)")
    p.add_argument("--to", dest="end", help="end instant (excluded): Unix ms or ISO 8601 (UTC)")
    p.add_argument("--by", choices=GROUP_BY, help="one invoice line per adapter, kind or day")
    p.add_argument("--csv", action="store_true", help="write CSV instead of a table")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    p.set_defaults(func=cmd_usage)


def line_cells(line: InvoiceLine) -> list[str]:
    """A line's cells, in :data:`COLUMNS` order (money to the micro-dollar, sub-micro shown
    in scientific notation so it never reads as zero)."""
    return [
        line.label,
        str(line.events),
        f"{line.gpu_ms:.3f}",
        str(line.billed_ms),
        str(line.prompt_tokens),
        str(line.completion_tokens),
        str(line.gradients),
        _usd(line.inference_cost_usd),
        _usd(line.training_cost_usd),
        _usd(line.cost_usd),
    ]


def _usd(amount: float) -> str:
    return f"{amount:.6f}" if amount == 0 or amount >= 1e-6 else f"{amount:.3e}"


def write_csv(inv: Invoice, out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for line in inv.lines:
        writer.writerow(line_cells(line))
    if inv.total is not None:
        writer.writerow(line_cells(inv.total))


def print_table(inv: Invoice, title: str, out: TextIO) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_footer=False)
    for i, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right")
    for line in inv.lines:
        table.add_row(*line_cells(line))
    if inv.total is not None:
        table.add_section()
        table.add_row(*line_cells(inv.total), style="bold")
    Console(file=out, width=200).print(table)


def cmd_usage(args: argparse.Namespace) -> int:
    from vajra.client import Client
    from vajra.client._usage import parse_when

    cfg = cluster_config(load_args_config(args), args)
    start = None if args.start is None else parse_when(args.start, "from")
    end = None if args.end is None else parse_when(args.end, "to")
    with Client(gateway_address(cfg, args), api_key(args), timeout_s=args.timeout) as client:
        report = client.usage(args.tenant, start, end, args.by)
    inv = report.invoice(Prices.of(cfg.policies), args.by)
    if args.csv:
        write_csv(inv, sys.stdout)
    else:
        span = f"{args.start or 'the beginning'} to {args.end or 'now'}"
        print_table(inv, f"usage of {report.name} ({report.tenant_id}), {span}", sys.stdout)
    return 0
