"""Hostile and careless trace files: each must fail with a TraceError naming row and column.

Rules: local files only (tmp_path); every case asserts the row and column, not only the type.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from vajra.errors import InvalidRequest
from vajra.traces import TraceError, load_trace

F19 = "azure-functions-2019"
INV_HEADER = "HashFunction,HashApp,HashOwner,minute_1,minute_2"
LLM_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens"
A21_HEADER = "app,func,end_timestamp,duration"


def _load(tmp_path: Path, text: str | bytes, fmt: str, name: str = "t.csv") -> None:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    load_trace(path, fmt)


@pytest.mark.parametrize(
    ("text", "fmt", "row", "column"),
    [
        ("", F19, 1, None),
        ("\n\n", F19, 1, None),
        (INV_HEADER, F19, 2, None),
        (INV_HEADER + "\nf,a,o,1", F19, 2, "minute_2"),  # truncated line
        (INV_HEADER + "\nf,a,o,1,2,3", F19, 2, "<extra field>"),
        (INV_HEADER + "\nf,a,o,1,2\ng,a,o,-1,2", F19, 3, "minute_1"),  # negative count
        (INV_HEADER + "\nf,a,o,1,nan", F19, 2, "minute_2"),
        (INV_HEADER + "\nf,a,o,1,inf", F19, 2, "minute_2"),
        (INV_HEADER + "\nf,a,o,1.5,2", F19, 2, "minute_1"),  # a fraction of an invocation
        (INV_HEADER + "\nf,a,o,1,99999999999999999999999", F19, 2, "minute_2"),
        (INV_HEADER + "\nf,a,o,1,seven", F19, 2, "minute_2"),
        ("HashApp,HashOwner,minute_1\na,o,1", F19, 1, "HashFunction"),  # wrong columns
        ("HashFunction,HashApp,HashOwner,Trigger\nf,a,o,http", F19, 1, "minute_1"),
        ("HashFunction,HashApp,HashApp,minute_1\nf,a,a,1", F19, 1, "HashApp"),
        (
            LLM_HEADER + "\n2023-11-16 18:15:46.6805900,1,1\nyesterday,1,1",
            "azure-llm-2023",
            3,
            "TIMESTAMP",
        ),
        (LLM_HEADER + "\n2023-13-45 18:15:46.6805900,1,1", "azure-llm-2023", 2, "TIMESTAMP"),
        (LLM_HEADER + "\nNaT,1,1", "azure-llm-2024", 2, "TIMESTAMP"),
        (LLM_HEADER + "\n2024-05-10 00:00:00+25:00,1,1", "azure-llm-2024", 2, "TIMESTAMP"),
        (LLM_HEADER + "\n2024-05-10 00:00:00,1,-3", "azure-llm-2024", 2, "GeneratedTokens"),
        (LLM_HEADER + "\n2024-05-10 00:00:00,3000000000,3", "azure-llm-2024", 2, "ContextTokens"),
        (LLM_HEADER + "\n2024-05-10 00:00:00,,3", "azure-llm-2024", 2, "ContextTokens"),
        (
            "TIMESTAMP,Context,GeneratedTokens\n2024-05-10 00:00:00,1,3",
            "azure-llm-2024",
            1,
            "ContextTokens",
        ),
        (A21_HEADER + "\na,f,10.0,-1", "azure-functions-2021", 2, "duration"),
        (A21_HEADER + "\na,f,1.0,5.0", "azure-functions-2021", 2, "duration"),
        (A21_HEADER + "\na,f,NaN,1", "azure-functions-2021", 2, "end_timestamp"),
        (A21_HEADER + '\na,"f,1.0,1', "azure-functions-2021", None, None),  # unclosed quote
    ],
)
def test_bad_file_names_row_and_column(
    tmp_path: Path, text: str, fmt: str, row: int | None, column: str | None
) -> None:
    with pytest.raises(TraceError) as info:
        _load(tmp_path, text, fmt)
    err = info.value
    assert isinstance(err, InvalidRequest)
    if row is not None:
        assert err.row == row, str(err)
        assert f"row {row}" in str(err)
    assert err.column == column, str(err)


def test_bom_crlf_and_gzip_are_read(tmp_path: Path) -> None:
    text = "\ufeff" + INV_HEADER + "\r\nf,a,o,1,2\r\n\r\ng,a,o,0,3\r\n"
    (tmp_path / "bom.csv").write_text(text, encoding="utf-8", newline="")
    assert len(load_trace(tmp_path / "bom.csv", F19)) == 6
    with gzip.open(tmp_path / "inv.csv.gz", "wt", encoding="utf-8") as fh:
        fh.write(text)
    assert len(load_trace(tmp_path / "inv.csv.gz", F19)) == 6


def test_binary_garbage_and_nul_bytes(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="UTF-8"):
        _load(tmp_path, b"\xff\xfe\x00garbage\x80\x81", F19)
    with pytest.raises(TraceError):
        _load(tmp_path, (INV_HEADER + "\nf,a\x00,o,1,2").encode(), F19)
    (tmp_path / "bad.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(TraceError):
        load_trace(tmp_path / "bad.csv.gz", F19)


def test_too_many_arrivals_is_refused_before_expanding(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text(INV_HEADER + "\nf,a,o,90000000,90000000\ng,a,o,90000000,90000000")
    with pytest.raises(TraceError, match="max_arrivals"):
        load_trace(path, F19)
    with pytest.raises(TraceError, match="max_arrivals"):
        load_trace(path, F19, max_arrivals=10)


def test_missing_file_unknown_format_and_options(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "absent.csv", F19)
    with pytest.raises(TraceError, match="holds no invocations"):
        load_trace(tmp_path, F19)
    (tmp_path / "x.csv").write_text(LLM_HEADER + "\n2024-05-10 00:00:00,1,1")
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(tmp_path / "x.csv", "parquet")
    with pytest.raises(TraceError, match="colour"):
        load_trace(tmp_path / "x.csv", "azure-llm-2024", colour="red")
    with pytest.raises(TraceError, match="spread"):
        load_trace(tmp_path, F19, spread="gaussian")


def test_companion_files_are_checked_too(tmp_path: Path) -> None:
    (tmp_path / "invocations.csv").write_text(INV_HEADER + "\nf,a,o,1,2")
    (tmp_path / "durations.csv").write_text("HashFunction,Average\nf,-5")
    with pytest.raises(TraceError) as info:
        load_trace(tmp_path, F19)
    assert info.value.row == 2 and info.value.column == "Average"
    (tmp_path / "durations.csv").write_text("HashFunction,Average\nf,5")
    (tmp_path / "memory.csv").write_text("HashApp,AverageAllocatedMb\na,12")
    trace = load_trace(tmp_path, F19)
    assert trace.duration_ms is not None and trace.duration_ms.tolist() == [5.0, 5.0, 5.0]
    assert trace.source_memory_mb is not None and trace.source_memory_mb.tolist() == [12.0]
