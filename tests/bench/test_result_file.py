"""Benchmarks write whole JSON files only, the latest result so far, marked partial until done."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vajra.bench.adapters import run_adapters_bench
from vajra.bench.result_file import (
    is_partial,
    partial_writer,
    remove_temporaries,
    write_result,
)


def test_a_write_replaces_the_file_whole_and_marks_a_partial_result(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "out.json"
    partial_writer(path)({"a": 1})
    assert json.loads(path.read_text()) == {"partial": True, "a": 1}
    assert is_partial(json.loads(path.read_text()))
    write_result(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert not is_partial(json.loads(path.read_text()))
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # no temporary file left


def test_a_failed_write_keeps_the_last_whole_result_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    path = tmp_path / "out.json"
    write_result(path, {"measured": [1, 2]}, partial=True)
    with pytest.raises(TypeError):
        write_result(path, {"measured": [1, 2, object()]})
    assert json.loads(path.read_text()) == {"partial": True, "measured": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    partial_writer(None)({"nothing": "written"})  # no path: a no-op


def test_temporaries_of_killed_writes_are_removed_and_nothing_else(tmp_path: Path) -> None:
    write_result(tmp_path / "kept.json", {"a": 1})
    (tmp_path / ".kept.json.x1y2.tmp").write_text('{"half": ')  # a write killed midway
    (tmp_path / "notes.tmp").write_text("not ours")
    remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "notes.tmp"]


@pytest.mark.timeout(300)
def test_the_adapters_bench_reports_each_part_as_it_finishes() -> None:
    snapshots: list[dict[str, Any]] = []
    result = run_adapters_bench(
        device="cpu",
        model_shape="tiny",
        activation_shape="tiny",
        counts=(1, 2),
        batch_size=2,
        new_tokens=2,
        repeats=1,
        activation_repeats=2,
        peft_max_adapters=1,
        partial=lambda so_far: snapshots.append(json.loads(json.dumps(so_far))),
    )
    # (a) alone, then (b) count by count for Vajra, then PEFT's one count.
    assert [("throughput" in s, "activation" in s) for s in snapshots] == [
        (False, True),
        (True, True),
        (True, True),
        (True, True),
    ]
    rows = [[r["adapters"] for r in s["throughput"]["results"]] for s in snapshots[1:]]
    assert rows == [[1], [1, 2], [1, 2]]
    assert "peft_tok_s" not in snapshots[2]["throughput"]["results"][0]
    assert "peft_tok_s" in snapshots[3]["throughput"]["results"][0]
    assert all("seconds" not in s for s in snapshots)  # only the whole result has its time
    assert snapshots[-1]["throughput"] == result["throughput"] and "seconds" in result
