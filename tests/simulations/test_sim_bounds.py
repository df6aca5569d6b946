"""Cold-start bounds of a trace (simulations/bounds.py): exact counts on small sequences, and
the agreement config's bounds in the order they must have."""

from __future__ import annotations

import json
from pathlib import Path

from simulations.bounds import bounds, lru_misses, main, spread_misses

REPO = Path(__file__).resolve().parents[2]


def test_lru_counts_each_miss_and_evicts_the_least_recent() -> None:
    assert lru_misses([], 2) == 0
    # 1 2 (1 hit) 3 evicts 2; 2 misses again and evicts 1; 1 misses.
    assert lru_misses([1, 2, 1, 3, 2, 1], 2) == 5
    assert lru_misses([1, 2, 1, 3, 2, 1], 3) == 3


def test_spread_keeps_hits_where_held_and_sends_cold_adapters_to_the_emptier_pool() -> None:
    # Two pools of one slot: 1 -> pool 0, 2 -> pool 1, then every repeat hits.
    assert spread_misses([1, 2, 1, 2, 1, 2], 2, 1) == 2
    # The same on one pool of one slot misses every time.
    assert lru_misses([1, 2, 1, 2, 1, 2], 1) == 6
    # 3 goes to pool 0 (both hold one; ties to the lowest), evicting 1; then 1 misses.
    assert spread_misses([1, 2, 3, 1], 2, 1) == 4
    assert spread_misses([1, 2, 3, 2], 2, 1) == 3


def test_the_agreement_config_bounds(tmp_path: Path) -> None:
    config = REPO / "simulations" / "configs" / "agreement_tiny.toml"
    b = bounds(config)["cold_starts"]
    assert b["compulsory"] <= b["spread"] <= b["one_executor"]
    out = tmp_path / "b.json"
    assert main(["--config", str(config), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["cold_starts"] == b
