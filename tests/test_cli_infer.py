"""``vajra infer`` with choices, log-probabilities and constrained output, against the
session's null cluster (tests/null_cluster.py).

Test rules: loopback only; the CLI runs in this process (``main``), with its own timeout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.null_cluster import NullCluster
from vajra.cli import main
from vajra.policies.decoding import StructuredOutput


def _infer(c: NullCluster, *args: str) -> int:
    return main(["infer", "--gateway", c.gateway, "--key", c.api_key, "--timeout", "20", *args])


def test_choices_and_logprobs_are_printed(
    null_cluster_running: NullCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _infer(null_cluster_running, "--n", "2", "--logprobs", "2", "cli choices") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "--- choice 0 ---",
        ".",
        f"{'-0.2500':>10}  '.'  ('a' -1.2500)",
        "--- choice 1 ---",
        ".",
        f"{'-0.2500':>10}  '.'  ('a' -1.2500)",
    ]
    assert len(null_cluster_running.admitted("cli choices")) == 2


def test_output_constraints_reach_the_engine(
    null_cluster_running: NullCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = null_cluster_running
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object"}))
    assert _infer(c, "--json-schema", str(schema), "cli schema") == 0
    assert _infer(c, "--response-format", "json_object", "--stream", "cli object") == 0
    assert capsys.readouterr().out == ".\n.\n"
    (with_schema,) = c.admitted("cli schema")
    assert with_schema.params.structured == StructuredOutput("json_schema", '{"type":"object"}')
    (with_object,) = c.admitted("cli object")
    assert with_object.params.structured == StructuredOutput("json_object")
    with pytest.raises(SystemExit, match="one choice"):
        _infer(c, "--stream", "--n", "2", "x")
    assert _infer(c, "--n", "17", "x") == 1  # InvalidRequest, printed
    assert "n must be" in capsys.readouterr().err
