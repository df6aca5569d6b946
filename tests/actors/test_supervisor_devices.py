"""`vajra up --executors N [--devices 0,1]`: which device each executor gets.

Test rules: pure functions on the CPU; the supervisor is run in-process only up to its
preflight checks, in a temporary VAJRA_HOME, under `trio.fail_after`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from vajra.actors import supervisor as sup_mod
from vajra.actors.actor_processes import actor_processes
from vajra.actors.supervisor import (
    Supervisor,
    executor_devices,
    parse_devices,
    run_supervisor,
)
from vajra.cli import _actor_config, build_parser
from vajra.config import VajraConfig


@pytest.mark.parametrize(
    ("n", "visible", "chosen", "want"),
    [
        (3, 2, None, ["cuda:0", "cuda:1", "cuda:0"]),
        (2, 4, None, ["cuda:0", "cuda:1"]),
        (4, 1, None, ["cuda:0"] * 4),
        (3, 0, None, ["cpu"] * 3),
        (3, 4, [2, 3], ["cuda:2", "cuda:3", "cuda:2"]),
        (2, 2, [1], ["cuda:1", "cuda:1"]),
        (0, 2, None, []),
    ],
)
def test_executor_devices_round_robin(
    n: int, visible: int, chosen: list[int] | None, want: list[str]
) -> None:
    assert executor_devices(n, visible, chosen) == want


@pytest.mark.parametrize(
    ("visible", "chosen", "needle"),
    [
        (2, [0, 2], "GPU 2 is not visible (2 visible: 0-1)"),
        (0, [0], "no CUDA GPU is visible"),
        (2, [], "names no GPU"),
    ],
)
def test_executor_devices_refuses_gpus_that_are_not_there(
    visible: int, chosen: list[int], needle: str
) -> None:
    with pytest.raises(ValueError) as info:
        executor_devices(2, visible, chosen)
    assert needle in str(info.value)


def test_parse_devices() -> None:
    assert parse_devices("") is None
    assert parse_devices("  ") is None
    assert parse_devices("0,1") == [0, 1]
    assert parse_devices(" 1 , 0 ") == [1, 0]
    for bad in ("a", "0,,1", "-1", "0;1", "1.5", "\N{FULLWIDTH DIGIT ZERO}"):
        with pytest.raises(ValueError, match="GPU indices"):
            parse_devices(bad)


def test_up_and_actor_parse_their_device_flags() -> None:
    args = build_parser().parse_args(["up", "--executors", "3", "--devices", "0,1"])
    assert (args.executors, args.devices) == (3, "0,1")
    args = build_parser().parse_args(["actor", "executor", "--device", "cuda:1"])
    assert _actor_config(args).executor.device == "cuda:1"
    args = build_parser().parse_args(["actor", "executor"])
    assert _actor_config(args).executor.device == "auto"


def test_each_executor_is_started_with_its_device(tmp_path: Path) -> None:
    cfg = VajraConfig()
    actors = actor_processes(cfg, tmp_path / "c.toml", ["cuda:0", "cuda:1", None])
    executors = {a.name: a.argv for a in actors if a.name.startswith("executor-")}
    assert sorted(executors) == ["executor-0", "executor-1", "executor-2"]
    for i, device in enumerate(["cuda:0", "cuda:1"]):
        argv = executors[f"executor-{i}"]
        assert argv[argv.index("--device") + 1] == device
        assert argv[argv.index("--executor-id") + 1] == f"exec-{i}"
    assert "--device" not in executors["executor-2"]  # executor.device as configured
    names = [a.name for a in actors]
    assert names[0] == "ledger" and names[-1] == "http"


async def _up(cfg: VajraConfig, capsys: pytest.CaptureFixture[str], **kw: int) -> tuple[int, str]:
    with trio.fail_after(60):
        code = await run_supervisor(Supervisor(cfg, **kw))
    out = capsys.readouterr()
    return code, out.out + out.err


def _cfg(tmp_path: Path, devices: str) -> VajraConfig:
    cfg = VajraConfig().replace("cluster", home=str(tmp_path / "home"), devices=devices)
    # A Redis URL that is never used: startup fails before anything connects.
    return cfg.replace("cluster", redis_url="redis://127.0.0.1:1").replace("http", enabled=False)


async def test_up_refuses_malformed_devices_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = await _up(_cfg(tmp_path, "0,x"), capsys, executors=2, gateway_port=0)
    assert code == 1
    assert out.strip().splitlines() == [
        "vajra: --devices must be GPU indices separated by commas (like 0,1), got '0,x'"
    ]


async def test_up_refuses_a_gpu_beyond_the_visible_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def two_gpus() -> int:
        return 2

    monkeypatch.setattr(sup_mod, "visible_gpu_count", two_gpus)
    code, out = await _up(_cfg(tmp_path, "1,2"), capsys, executors=2, gateway_port=0)
    assert code == 1
    assert out.strip().splitlines() == [
        "vajra: --devices 1,2: GPU 2 is not visible (2 visible: 0-1)"
    ]


async def test_without_cuda_chosen_gpus_are_refused_by_the_real_probe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert await sup_mod.visible_gpu_count() == 0
    code, out = await _up(_cfg(tmp_path, "0"), capsys, executors=1, gateway_port=0)
    assert code == 1
    assert out.strip().splitlines() == ["vajra: --devices 0: no CUDA GPU is visible"]
