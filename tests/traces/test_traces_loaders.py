"""Trace loaders on the bundled real samples and on small hand-written files.

Rules: local files only (tmp_path), no network; every expected figure is computed from the
file itself, not copied from a previous run.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest

from vajra.traces import (
    Trace,
    TraceError,
    bundled,
    load_trace,
    map_to_adapters,
    parse_timestamps,
    synthetic_slora,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _count_csv_cells(path: Path, first_count_col: int) -> int:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        rows = list(csv.reader(fh))[1:]
    return sum(int(c) for r in rows for c in r[first_count_col:])


def test_azure_2019_thousand_function_day_matches_its_counts() -> None:
    base = bundled("azure_functions_2019_1000")
    trace = load_trace(base, "azure-functions-2019", seed=3)
    assert len(trace) == _count_csv_cells(base / "invocations.csv.gz", 3)
    assert len(trace.sources) == 1000
    assert float(trace.t_ms[0]) >= 0 and float(trace.t_ms[-1]) < 1440 * 60_000
    assert np.all(np.diff(trace.t_ms) >= 0)
    # durations joined per function, memory per app
    assert trace.duration_ms is not None and np.isfinite(trace.duration_ms).mean() > 0.9
    assert trace.source_memory_mb is not None and np.nanmax(trace.source_memory_mb) > 0


def test_azure_2019_one_function_layout_even_spread(tmp_path: Path) -> None:
    src = bundled("azure_functions_2019_one_function") / "invocations.csv"
    header, row = src.read_text().splitlines()[:2]
    cells = row.split(",")
    # keep the first 10 minutes so the test stays small; other minutes are zero
    counts = [str(min(int(c), 7)) for c in cells[4:14]] + ["0"] * (len(cells) - 14)
    path = _write(tmp_path / "inv.csv", header + "\n" + ",".join(cells[:4] + counts))
    trace = load_trace(path, "azure-functions-2019", spread="even")
    expected = sum(int(c) for c in counts)
    assert len(trace) == expected
    per_minute = np.bincount((trace.t_ms // 60_000).astype(int), minlength=10)[:10]
    assert per_minute.tolist() == [int(c) for c in counts[:10]]
    # even spread: c arrivals sit at (k + 0.5) / c of the minute
    first_minute = trace.t_ms[trace.t_ms < 60_000]
    c = len(first_minute)
    assert np.allclose(first_minute, (np.arange(c) + 0.5) / c * 60_000)


def test_azure_2019_group_by_app_and_uniform_spread_is_seeded(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "inv.csv",
        "HashFunction,HashApp,HashOwner,minute_1,minute_2\nf1,a,o,3,0\nf2,a,o,1,2\nf3,b,o,0,4",
    )
    by_app = load_trace(path, "azure-functions-2019", group_by="app", seed=1)
    assert by_app.sources == ["a", "b"]
    assert by_app.counts_by_source().tolist() == [6, 4]
    again = load_trace(path, "azure-functions-2019", group_by="app", seed=1)
    other = load_trace(path, "azure-functions-2019", group_by="app", seed=2)
    assert np.array_equal(by_app.t_ms, again.t_ms)
    assert not np.array_equal(by_app.t_ms, other.t_ms)


def test_azure_2021_starts_at_end_minus_duration() -> None:
    path = bundled("azure_functions_2021_200")
    trace = load_trace(path, "azure-functions-2021")
    assert len(trace) == 199 and len(trace.sources) == 31
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    starts = sorted(max(0.0, float(r["end_timestamp"]) - float(r["duration"])) * 1000 for r in rows)
    assert np.allclose(trace.t_ms, starts)
    apps = load_trace(path, "azure-functions-2021", group_by="app")
    assert len(apps.sources) == 13


@pytest.mark.parametrize("name", ["azure_llm_2023_code", "azure_llm_2023_conv"])
def test_azure_llm_2023_samples(name: str) -> None:
    trace = load_trace(bundled(name), "azure-llm-2023")
    assert len(trace) > 8000 and trace.t_ms[0] == 0.0
    assert 3000 < trace.duration_s < 4000  # about an hour
    assert int(trace.prompt_tokens.max()) > 1000


def test_both_timestamp_forms_parse_to_the_same_instant() -> None:
    stamps = [
        "2023-11-16 18:15:46.6805900",
        "2023-11-16 18:15:46.680590+00:00",
        "2023-11-16 19:15:46.680590+01:00",
        "2023-11-16T18:15:46.68059Z",
        "2023-11-16 18:15:46",
    ]
    ns = parse_timestamps(stamps, [2, 3, 4, 5, 6], "TIMESTAMP")
    assert len(set(ns[:4].tolist())) == 1
    assert ns[0] - ns[4] == 680_590_000


def test_azure_llm_2024_form(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "llm24.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2024-05-10 00:00:01+00:00,10,2\n"
        "2024-05-10 00:00:00.009930+00:00,100,20\n"
        "2024-05-10 00:00:00.509930+00:00,5,0",
    )
    trace = load_trace(path, "azure-llm-2024")
    assert np.allclose(trace.t_ms, [0.0, 500.0, 990.07])
    assert trace.prompt_tokens.tolist() == [100, 5, 10]
    assert trace.output_tokens.tolist() == [20, 0, 2]


def test_synthetic_slora_rate_cv_and_skew() -> None:
    poisson = synthetic_slora(adapters=50, rate_per_s=200, cv=1, alpha=1, duration_s=60, seed=0)
    assert 0.9 * 12_000 < len(poisson) < 1.1 * 12_000
    gaps = np.diff(poisson.t_ms)
    assert 0.85 < gaps.std() / gaps.mean() < 1.15
    bursty = synthetic_slora(adapters=50, rate_per_s=200, cv=4, alpha=1, duration_s=60, seed=0)
    bgaps = np.diff(bursty.t_ms)
    assert bgaps.std() / bgaps.mean() > 2.5
    skewed = synthetic_slora(adapters=50, rate_per_s=200, cv=1, alpha=0.1, duration_s=60, seed=0)
    counts = skewed.counts_by_source()
    assert counts[0] > 0.5 * len(skewed)  # power(0.1): most mass near adapter 0
    assert int(skewed.prompt_tokens.min()) >= 8 and int(skewed.prompt_tokens.max()) <= 512
    again = synthetic_slora(adapters=50, rate_per_s=200, cv=1, alpha=0.1, duration_s=60, seed=0)
    assert np.array_equal(skewed.t_ms, again.t_ms) and np.array_equal(skewed.source, again.source)


def test_mapping_modes() -> None:
    trace = Trace(
        t_ms=[0, 1, 2, 3, 4, 5],
        source=[2, 2, 2, 0, 0, 1],
        prompt_tokens=[1] * 6,
        output_tokens=[1] * 6,
        sources=["x", "y", "z"],
        name="t",
    )
    one = map_to_adapters(trace, 3, mode="one-to-one")
    assert one.source.tolist() == [0, 0, 0, 1, 1, 2]  # busiest source is adapter 0
    striped = map_to_adapters(trace, 2, mode="striped")
    assert striped.source.tolist() == [0, 0, 0, 1, 1, 0]
    assert striped.sources == ["0", "1"]
    with pytest.raises(TraceError, match="one-to-one"):
        map_to_adapters(trace, 2, mode="one-to-one")
    power = map_to_adapters(trace, 1000, mode="power-law", alpha=0.5, seed=4)
    assert int(power.source.max()) < 1000


def test_slice_head_and_iteration() -> None:
    trace = synthetic_slora(adapters=5, rate_per_s=50, cv=1, alpha=1, duration_s=10, seed=2)
    part = trace.slice(2000, 4000)
    assert len(part) > 0 and part.t_ms.min() >= 2000 and part.t_ms.max() < 4000
    assert len(trace.head(7)) == 7 and len(trace.head(10**9)) == len(trace)
    arrivals = list(trace.head(3))
    assert [a.t_ms for a in arrivals] == trace.t_ms[:3].tolist()
    assert all(a.function in trace.sources and a.duration_ms is None for a in arrivals)
    assert trace.rebased().t_ms[0] == 0.0
    with pytest.raises(ValueError):
        trace.t_ms[0] = 5.0  # read-only
