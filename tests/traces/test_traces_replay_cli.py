"""``vajra replay``'s command line: trace selection, cutting and mapping, and refusals.

Rules: no cluster is needed (the refusals happen before one is contacted); local files only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vajra.cli import build_parser, main
from vajra.cli._replay import load_for_replay
from vajra.traces import TraceError


def _args(*argv: str) -> object:
    return build_parser().parse_args(["replay", *argv])


def test_bundled_name_duration_and_default_mapping() -> None:
    args = _args(
        "azure_functions_2021_200", "--format", "azure-functions-2021", "--duration", "600"
    )
    trace = load_for_replay(args)  # type: ignore[arg-type]
    assert trace.t_ms[0] == 0.0 and float(trace.t_ms[-1]) < 600_000
    assert len(trace.sources) <= 31 and trace.sources[0] == "0"
    # one source (an LLM trace) is spread power-law over --adapters
    args = _args(
        "azure_llm_2023_code",
        "--format",
        "azure-llm-2023",
        "--adapters",
        "50",
        "--duration",
        "120",
        "--alpha",
        "0.3",
    )
    llm = load_for_replay(args)  # type: ignore[arg-type]
    assert len(llm.sources) == 50 and len(set(llm.source.tolist())) > 5


def test_empty_window_and_unknown_trace_are_refused() -> None:
    args = _args("azure_functions_2021_200", "--format", "azure-functions-2021", "--start", "99999")
    with pytest.raises(TraceError, match="no arrivals"):
        load_for_replay(args)  # type: ignore[arg-type]
    args = _args("no_such_trace", "--format", "azure-llm-2023")
    with pytest.raises(TraceError, match="no such trace"):
        load_for_replay(args)  # type: ignore[arg-type]


def test_cli_refuses_without_a_model_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAJRA_HOME", str(tmp_path))
    code = main(
        [
            "replay",
            "azure_functions_2021_200",
            "--format",
            "azure-functions-2021",
            "--model",
            str(tmp_path / "absent"),
        ]
    )
    assert code == 1
    assert "base model's directory" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nsoon,1,1")
    code = main(["replay", str(bad), "--format", "azure-llm-2024", "--model", str(tmp_path)])
    assert code == 1
    assert "row 2" in capsys.readouterr().err
