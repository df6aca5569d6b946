"""`vajra bench placement` runs and reports what it promises (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vajra.bench.placement import run_placement_bench
from vajra.cli import main


def test_small_run_reports_every_size() -> None:
    r = run_placement_bench(
        sizes=(3, 30), decisions=200, adapters=500, tenants=20, scan_decisions=20
    )
    assert [s["executors"] for s in r["sizes"]] == [3, 30]
    for s in r["sizes"]:
        assert s["placed"] == 200  # plenty of room: every decision places
        assert s["index_us_mean"] > 0 and s["scan_us_mean"] > 0
    assert r["growth"]["executors_ratio"] == 10


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    assert (
        main(["bench", "placement", "--json", str(out), "--decisions", "50", "--sizes", "2,4"]) == 0
    )
    data = json.loads(out.read_text())
    assert data["bench"] == "placement" and [s["executors"] for s in data["sizes"]] == [2, 4]
    assert main(["bench", "placement", "--json", str(out), "--sizes", "2,x"]) == 2
    assert main(["bench", "placement", "--json", str(out), "--sizes", "0"]) == 2


@pytest.mark.parametrize("kw", [dict(decisions=0), dict(sizes=(0,)), dict(adapters=0)])
def test_bad_arguments_are_refused(kw: dict) -> None:
    with pytest.raises(ValueError):
        run_placement_bench(**kw)
