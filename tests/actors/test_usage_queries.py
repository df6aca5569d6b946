"""The usage query path: gateway -> state buckets -> SDK report -> invoice (CLI and HTTP).

Actors run in-process on real sockets (ipc in a temp dir) and a real Valkey; the usage is
written through the state layer (what the ledger would have recorded), so the figures are
known exactly. Test rules: loopback/ipc only; every test under ``trio.fail_after``.
"""

from __future__ import annotations

import csv
import io
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import trio

from tests.inprocess import inprocess_config
from vajra.actors.gateway import Gateway
from vajra.actors.scheduler import Scheduler
from vajra.cli._usage import COLUMNS, print_table, write_csv
from vajra.client import (
    AsyncClient,
    AuthError,
    Client,
    InvalidRequest,
    NotFoundError,
    UsageReport,
)
from vajra.client._usage import parse_when
from vajra.config import VajraConfig
from vajra.http import HttpBridge
from vajra.policies.billing import MS_PER_DAY, Prices
from vajra.state import ClusterState, UsageRecord

ADMIN = "admin-key-for-tests"
DAY0 = 20_000  # 2024-10-04


@pytest.fixture
def cfg(tmp_path: Path, valkey_url: str) -> VajraConfig:
    return (
        inprocess_config(tmp_path / "run", valkey_url)
        .replace("http", admin_key=ADMIN, port=0)
        .replace("policies", billing_granularity_ms=10)
    )


def _tenant(valkey_url: str) -> tuple[str, str, str]:
    name = f"t{uuid.uuid4().hex[:8]}"
    with ClusterState(valkey_url) as s:
        t, key = s.tenants.create(name)
    return t.tenant_id, name, key


def _usage(state: ClusterState, tenant_id: str) -> None:
    """Three days of usage: base and an adapter (two versions), inference and training."""
    recs = []
    for d in range(3):
        ts = (DAY0 + d) * MS_PER_DAY + 1000
        recs += [
            UsageRecord(f"{tenant_id}-b{d}", tenant_id, "r", "e", 12.5, 5, 7, ts, billed_ms=20),
            UsageRecord(
                f"{tenant_id}-a{d}",
                tenant_id,
                "r",
                "e",
                3.0,
                2,
                1,
                ts,
                "chat",
                1 + d % 2,
                billed_ms=10,
            ),
            UsageRecord(
                f"{tenant_id}-t{d}",
                tenant_id,
                "j.1",
                "e",
                40.0,
                64,
                0,
                ts,
                "chat",
                2,
                kind="training",
                gradients=1_000_000,
            ),
        ]
    assert all(state.usage.record_many(recs))


async def test_usage_reports_ranges_groups_and_costs(
    cfg: VajraConfig, valkey_url: str, raw: redis.Redis[str]
) -> None:
    tenant_id, name, key = _tenant(valkey_url)
    other_id, _, other_key = _tenant(valkey_url)
    with ClusterState(valkey_url) as state:
        _usage(state, tenant_id)
        _usage(state, other_id)
    prices = Prices.of(cfg.policies)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(Scheduler(cfg).run)
            with ClusterState(valkey_url) as state:
                gateway = await nursery.start(Gateway(cfg, state).run)
                async with AsyncClient(gateway, key, timeout_s=10) as c:
                    report = await c.usage(group_by="kind")
                    assert (report.tenant_id, report.name) == (tenant_id, name)
                    assert (report.requests, report.billed_ms, report.gradients) == (
                        9,
                        90,
                        3_000_000,
                    )
                    inv = report.invoice(prices)
                    assert [line.label for line in inv.lines] == ["inference", "training"]
                    assert inv.total is not None
                    assert (
                        inv.total.cost_usd
                        == 90 * 2.0 / 3_600_000 * 0.3 + 3_000_000 * 0.05 / 1_000_000 * 2.0
                    )
                    # One day only, by adapter: the range selects buckets by UTC day.
                    day1 = (DAY0 + 1) * MS_PER_DAY
                    one = await c.usage(None, day1, day1 + MS_PER_DAY, "adapter")
                    assert {r.day for r in one.rows} == {DAY0 + 1}
                    labels = [line.label for line in one.invoice(prices).lines]
                    assert labels == ["(base)", "chat@2"]
                    assert (await c.usage(tenant=name)).tenant_id == tenant_id
                    # Another tenant's usage: not found, whether named by id or name.
                    for ref in (other_id, "t_0000000000000000"):
                        with pytest.raises(NotFoundError):
                            await c.usage(ref)
                    # Careless input is refused before it is sent.
                    for bad in (
                        {"group_by": "tenant"},
                        {"start": day1, "end": day1},
                        {"start": -1},
                        {"start": "yesterday"},
                    ):
                        with pytest.raises(InvalidRequest):
                            await c.usage(**bad)  # type: ignore[arg-type]
                # The admin key sees any tenant, and must name one.
                async with AsyncClient(gateway, ADMIN, timeout_s=10) as admin:
                    other_report = await admin.usage(other_id, group_by="day")
                    assert other_report.tenant_id == other_id
                    with pytest.raises(InvalidRequest):
                        await admin.usage()
                    with pytest.raises(NotFoundError):
                        await admin.usage("nobody-by-that-name")
                async with AsyncClient(gateway, "vk_wrong", timeout_s=10) as stranger:
                    with pytest.raises(AuthError):
                        await stranger.usage(tenant_id)
                # The blocking client answers the same.
                sync_report = await trio.to_thread.run_sync(_sync_usage, gateway, other_key)
                assert sync_report == other_report and len(sync_report.rows) == 9
                # The HTTP bridge: the same rows, priced.
                bridge = HttpBridge(cfg.replace("cluster", gateway_address=gateway))
                base_url: str = await nursery.start(bridge.run)
                async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
                    h = {"Authorization": f"Bearer {key}"}
                    r = await http.get(f"/v1/usage/{tenant_id}/metrics?group_by=day", headers=h)
                    assert r.status_code == 200, r.text
                    body = r.json()
                    assert [line["label"] for line in body["lines"]] == [
                        "2024-10-04",
                        "2024-10-05",
                        "2024-10-06",
                    ]
                    assert body["total"]["cost_usd"] == inv.total.cost_usd
                    assert body["cost_usd"] == inv.total.cost_usd  # all time == all days here
                    assert body["billed_ms"] == 90 and body["gradients"] == 3_000_000
                    r = await http.get(
                        f"/v1/usage/{tenant_id}/metrics",
                        params={"start": "2024-10-05", "end": "2024-10-06T00:00:00"},
                        headers=h,
                    )
                    assert [row["events"] for row in r.json()["lines"]] == [3]
                    for q in ("group_by=tenant", "start=soon", "start=5&end=5"):
                        r = await http.get(f"/v1/usage/{tenant_id}/metrics?{q}", headers=h)
                        assert r.status_code == 400, (q, r.text)
                    r = await http.get(f"/v1/usage/{other_id}/metrics", headers=h)
                    assert r.status_code == 404
                await bridge.drain()
            nursery.cancel_scope.cancel()
    # The CLI's invoice, as CSV and as a table.
    out = io.StringIO()
    write_csv(inv, out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == list(COLUMNS)
    assert [r[0] for r in rows[1:]] == ["inference", "training", "total"]
    assert int(rows[-1][3]) == 90 and int(rows[-1][6]) == 3_000_000
    table = io.StringIO()
    print_table(inv, "usage", table)
    assert "training" in table.getvalue() and "3000000" in table.getvalue()


def _sync_usage(gateway: str, key: str) -> UsageReport:
    with Client(gateway, key, timeout_s=10) as c:
        return c.usage(group_by="day")


def test_times_are_unix_ms_or_iso_utc() -> None:
    assert parse_when("1700000000000", "from") == 1_700_000_000_000
    assert parse_when("1970-01-02", "from") == MS_PER_DAY
    assert parse_when("1970-01-01T01:00:00+01:00", "from") == 0
    for bad in ("", "tomorrow", "-5", "1970-13-01"):
        with pytest.raises(InvalidRequest):
            parse_when(bad, "from")
