"""Config parsing, bench calibration, baseline costs and the command line of the simulator.

No network; files only under tmp_path; each run simulates a few hundred requests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simulations import baselines
from simulations.calibration import adapter_tiers, calibrated, engine_costs
from simulations.config import SimConfigError, load_config, parse_config
from simulations.run import main
from vajra.policies.billing import MS_PER_HOUR, inference_cost_usd

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "simulations" / "configs").glob("*.toml"))


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"nope": {}}, "unknown sections"),
        ({"cluster": {"gpus": 3}}, "unknown keys"),
        ({"cluster": {"executors": "two"}}, "[cluster] executors"),
        ({"cluster": {"executors": 0}}, "must be positive"),
        ({"cluster": {"host_bytes": -1}}, ">= 0"),
        ({"cluster": {"host_gbps": float("nan")}}, "finite"),
        ({"policy": {"placement": "round-robin"}}, "not one of"),
        ({"policy": {"prefetch": True}}, "booleans"),
        ({"trace": {"kind": "file"}}, "needs format and path"),
        ({"cluster": []}, "expected a table"),
    ],
)
def test_bad_config_names_section_and_key(data: dict[str, object], needle: str) -> None:
    with pytest.raises(SimConfigError, match=None) as e:
        parse_config(data)
    assert needle in str(e.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(SimConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nname=")
    with pytest.raises(SimConfigError):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_parse_and_calibrate(path: Path) -> None:
    cfg = calibrated(load_config(path))
    assert cfg.run.name == path.stem


def test_calibration_from_the_bench_results() -> None:
    costs = engine_costs(REPO / "docs" / "bench-results" / "engine-after-paged-kv.json")
    assert all(v >= 0 for v in costs.values()) and costs["decode_ms_base"] > 0
    tiers = adapter_tiers(REPO / "docs" / "bench-results" / "adapters-cpu-small-paged.json")
    # 601,584 bytes in 0.1543 ms from pinned memory
    assert tiers["host_gbps"] == pytest.approx(601_584 / 0.1543e6)
    assert tiers["host_gbps"] > tiers["disk_gbps"] > 0


def test_calibration_rejects_the_wrong_json(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"activation": {}}))
    with pytest.raises(SimConfigError, match="missing"):
        adapter_tiers(wrong)
    with pytest.raises(SimConfigError, match="not a vajra bench engine"):
        engine_costs(wrong)
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(SimConfigError, match="JSON object"):
        engine_costs(tmp_path / "list.json")


def test_keepalive_baseline_by_hand() -> None:
    cfg = parse_config({
        "costs": {"prefill_ms_base": 10.0, "prefill_ms_per_token": 0.0,
                  "decode_ms_base": 5.0, "decode_ms_per_seq": 0.0},
        "economics": {"serverless_keepalive_ms": 600_000.0, "serverless_cold_start_ms": 3_000.0,
                      "gpu_price_per_hour": 2.0},
    })  # fmt: skip
    t = np.array([0.0, 1_000.0, 700_000.0, 5.0])
    src = np.array([0, 0, 0, 1])
    prompt = np.zeros(4, dtype=np.int32)
    output = np.array([1, 1, 1, 3], dtype=np.int32)  # service 10, 10, 10 and 10 + 2 x 5 = 20
    r = baselines.keepalive_serverless(cfg, t, src, prompt, output)
    k = 600_000.0
    held = 1_000.0 + (10 + k) + (10 + k) + (20 + k)
    colds = 3  # adapter 0 at 0 and at 700,000 (699,000 ms idle > 600,010); adapter 1 at 5
    assert r["cold_starts"] == colds
    want = inference_cost_usd(held + colds * 3_000.0, gpu_price_per_hour=2.0, tenancy_factor=1.0)
    assert r["cost_usd"] == pytest.approx(want, abs=1e-6)
    assert r["cost_per_request_usd"] == pytest.approx(want / 4)
    d = baselines.dedicated(cfg, src, span_ms=MS_PER_HOUR)
    assert d["gpus"] == 2 and d["cost_usd"] == pytest.approx(2 * 2.0)
    empty = baselines.keepalive_serverless(cfg, t[:0], src[:0], prompt[:0], output[:0])
    assert empty["cost_per_request_usd"] is None


def test_command_line_writes_json_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(
        '[run]\nname = "tiny"\n[trace]\nadapters = 20\nrate_per_s = 20.0\nduration_s = 10.0\n'
        "prompt_tokens = 16\noutput_tokens = 4\n[cluster]\nexecutors = 2\n"
    )
    rc = main(["--config", str(cfg), "--json", str(tmp_path / "out.json"),
               "--plots", str(tmp_path / "plots"), "--quiet"])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["completed"] == report["requests"] > 100
    assert json.loads(capsys.readouterr().out)["requests"] == report["requests"]
    eco = report["economics"]
    assert eco["vajra"]["cost_per_request_usd"] > 0 and eco["dedicated"]["gpus"] <= 20
    assert (
        sorted(p.name for p in (tmp_path / "plots").iterdir())
        == [
            "tiny-cost.png",
            "tiny-ttft-cdf.png",
            "tiny-utilisation.png",
            "tiny-tenants.png",
        ]
        or len(list((tmp_path / "plots").iterdir())) == 4
    )
    assert main(["--config", str(cfg), "--set", "cluster.executors=-1", "--quiet"]) == 2
    assert main(["--config", str(cfg), "--set", "oops", "--quiet"]) == 2
