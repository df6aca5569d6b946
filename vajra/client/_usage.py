"""The SDK's usage call: a tenant's usage over a range of days, ready to be invoiced.

``client.usage(tenant=None, start=None, end=None, group_by=None)`` sends a
:class:`~vajra.bus.messages.UsageQuery` and returns a :class:`UsageReport`: the tenant's
running totals and its (UTC day, adapter, version, kind) buckets in ``[start, end)``.
:meth:`UsageReport.invoice` prices them with :mod:`vajra.policies.billing` (the one place of
billing arithmetic), grouped by ``group_by``.

``start`` / ``end``: a timezone-aware :class:`~datetime.datetime` (a naive one is taken as
UTC) or Unix milliseconds. Arguments are checked before anything is sent (InvalidRequest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from vajra.bus.messages import UsageQuery, UsageReply
from vajra.client._replies import expect
from vajra.client._requests import new_request_id
from vajra.errors import InvalidRequest
from vajra.policies.billing import GROUP_BY, Invoice, Prices, UsageRow, invoice

#: A point in time the usage call accepts.
When = datetime | int | None


@dataclass(frozen=True, slots=True)
class UsageReport:
    """A tenant's usage as the ledger recorded it: running totals (all time) and the buckets
    of the days asked for (``rows``). ``billed_ms`` is GPU time rounded up per request."""

    tenant_id: str
    name: str
    requests: int
    gpu_ms: float
    prompt_tokens: int
    completion_tokens: int
    billed_ms: int = 0
    gradients: int = 0
    rows: tuple[UsageRow, ...] = field(default_factory=tuple)
    group_by: str | None = None

    def invoice(self, prices: Prices | None = None, group_by: str | None = None) -> Invoice:
        """The rows priced (``prices``: the paper's defaults when None), grouped by
        ``group_by`` (default: the one asked for). ValueError for an unknown grouping."""
        return invoice(self.rows, group_by or self.group_by, prices or Prices())


def unix_ms(value: When, name: str) -> int | None:
    """``value`` as Unix milliseconds (None stays None); InvalidRequest if it is not a time."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        ms = int(value.timestamp() * 1000)
    elif isinstance(value, int) and not isinstance(value, bool):
        ms = value
    else:
        raise InvalidRequest(f"{name} must be a datetime or Unix milliseconds", field=name)
    if ms < 0:
        raise InvalidRequest(f"{name} must not be before 1970", field=name)
    return ms


def usage_query(
    api_key: str, tenant: str | None, start: When, end: When, group_by: str | None
) -> UsageQuery:
    """The query for :meth:`Client.usage`, its arguments checked (InvalidRequest)."""
    if tenant is not None and (not isinstance(tenant, str) or not tenant):
        raise InvalidRequest("tenant must be a non-empty string", field="tenant")
    if group_by is not None and group_by not in GROUP_BY:
        raise InvalidRequest(f"group_by must be one of {', '.join(GROUP_BY)}", field="group_by")
    start_ms, end_ms = unix_ms(start, "start"), unix_ms(end, "end")
    if start_ms is not None and end_ms is not None and end_ms <= start_ms:
        raise InvalidRequest("end must be after start", field="end")
    return UsageQuery(
        request_id=new_request_id(),
        api_key=api_key,
        tenant=tenant,
        start_unix_ms=start_ms,
        end_unix_ms=end_ms,
        group_by=group_by,
    )


def usage_report(outcome: object) -> UsageReport:
    """The :class:`UsageReport` of a :class:`UsageReply` (ProtocolError for another reply)."""
    u = expect(outcome, UsageReply)
    rows = tuple(
        UsageRow(
            day=r.day,
            adapter=r.adapter,
            adapter_version=r.adapter_version,
            kind=r.kind,
            events=r.events,
            gpu_us=r.gpu_us,
            billed_ms=r.billed_ms,
            prompt_tokens=r.prompt_tokens,
            completion_tokens=r.completion_tokens,
            gradients=r.gradients,
        )
        for r in u.rows
    )
    return UsageReport(
        u.tenant_id,
        u.name,
        u.requests,
        u.gpu_ms,
        u.prompt_tokens,
        u.completion_tokens,
        u.billed_ms,
        u.gradients,
        rows,
        u.group_by,
    )


def parse_when(text: str, name: str) -> int:
    """A time as typed by a person: Unix milliseconds (digits) or an ISO 8601 date or date
    and time (no zone: UTC). InvalidRequest if it is neither."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(
            f"{name} must be Unix milliseconds or an ISO 8601 date/time, not {text!r}", field=name
        ) from None
    ms = unix_ms(value, name)
    assert ms is not None
    return ms
