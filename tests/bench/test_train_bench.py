"""`vajra bench train` runs on the tiny model in seconds and writes the documented JSON."""

from __future__ import annotations

import json
from pathlib import Path

from vajra.cli import main


def test_quick_train_bench_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--quick", "--json", str(out), "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["bench"] == "train" and result["device"] == "cpu"
    assert "partial" not in result  # the whole result replaced the partial ones
    training = result["training"]
    for side in ("vajra", "peft"):
        assert training[side]["tokens_per_s"] > 0
        assert len(training[side]["losses"]) == 4  # 1 warm-up + 3 timed steps
    # the same adapter, data and loss: the two loss curves agree
    for ours, theirs in zip(training["vajra"]["losses"], training["peft"]["losses"], strict=True):
        assert abs(ours - theirs) <= 1e-3 * abs(theirs)
    assert training["ratio"] > 0 and isinstance(training["met"], bool)
    latency = result["latency"]
    for run in ("no_job", "preemption_on", "preemption_off"):
        assert latency[run]["itl_ms"]["n"] > 0 and latency[run]["ttft_ms"]["n"] == 3
        assert latency[run]["itl_ms"]["p50"] <= latency[run]["itl_ms"]["p99"]
    assert latency["no_job"]["micro_steps"] == 0
    assert latency["preemption_on"]["micro_steps"] > 0
    assert latency["preemption_off"]["micro_steps"] > 0
    assert isinstance(latency["met"], bool) and latency["target_p99_itl_ms"] > 0
