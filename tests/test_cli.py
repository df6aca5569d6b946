"""The ``vajra`` command line without a running cluster: its parser, its help, its formatting,
``config show``'s choice of settings, and the ``tenant``/``status`` commands on a real Valkey.

Rules: loopback only; the Valkey is the session's real one; no process is left running.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import replace
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest

from vajra.cli import build_parser, main
from vajra.cli._cluster import admin_key_note
from vajra.cli._config import effective_settings
from vajra.cli._status import format_age, format_time, heartbeat_line
from vajra.config import VajraConfig, dump_toml
from vajra.state import ClusterState, ExecutorHeartbeat


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty VAJRA_HOME, and no other VAJRA_ variable."""
    for name in list(os.environ):
        if name.startswith("VAJRA_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("VAJRA_HOME", str(home))
    return home


def _subparser(name: str) -> object:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    return sub.choices[name]  # type: ignore[index]


# --- the entry point and --version ------------------------------------------------------------


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"vajra {metadata.version('vajra')}"


def test_console_script_is_main() -> None:
    scripts = metadata.entry_points(group="console_scripts")
    (entry,) = [e for e in scripts if e.name == "vajra"]
    assert entry.value == "vajra.cli:main"
    assert entry.load() is main


def test_python_dash_m_vajra_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vajra", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"vajra {metadata.version('vajra')}"


# --- help ---------------------------------------------------------------------------------


def test_infer_help_describes_every_option_and_its_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAJRA_API_KEY", "vk_must-not-show")
    infer = _subparser("infer")
    options = [a for a in infer._actions if a.option_strings and a.dest != "help"]  # type: ignore[attr-defined]
    assert {o.dest for o in options} >= {"key", "adapter", "max_tokens", "stop", "timeout"}
    for action in options:
        assert action.help and "(default: " in action.help, action.option_strings
    with pytest.raises(SystemExit):
        main(["infer", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("(default: 64)", "(default: 0.0)", "(default: 1.0, all)", "(default: 60.0)"):
        assert shown in text
    assert "(default: $VAJRA_API_KEY)" in text
    assert "vk_must-not-show" not in text  # the key itself is read only when the command runs


def test_key_comes_from_the_environment_when_the_command_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vajra.cli._common import api_key

    args = build_parser().parse_args(["infer", "hello"])
    monkeypatch.setenv("VAJRA_API_KEY", "vk_from-env")
    assert api_key(args) == "vk_from-env"
    args = build_parser().parse_args(["adapter", "list", "--key", "vk_flag"])
    assert api_key(args) == "vk_flag"


# --- times in `vajra status` -------------------------------------------------------------


def test_format_age() -> None:
    assert format_age(0.42) == "0.4 s ago"
    assert format_age(-0.3) == "0.0 s ago"  # a clock a little ahead
    assert format_age(-5) == "5.0 s from now (clocks differ)"
    assert format_age(59.9) == "59.9 s ago"
    assert format_age(90) == "1.5 min ago"
    assert format_age(2 * 3600) == "2.0 h ago"
    assert format_age(3 * 86400) == "3.0 d ago"


def test_format_time_is_iso_8601_with_an_offset() -> None:
    shown = format_time(1_700_000_000.7)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", shown), shown
    assert datetime.fromisoformat(shown).timestamp() == 1_700_000_000


def _heartbeat(updated_ms: int) -> ExecutorHeartbeat:
    return ExecutorHeartbeat(
        executor_id="exec-0",
        incarnation="inc-1",
        model="tiny",
        device="cpu",
        free_memory_bytes=3 * 2**30,
        queue_depth=2,
        running=1,
        resident_adapters=("a",),
        max_batch_size=32,
        updated_ms=updated_ms,
    )


def test_heartbeat_line_shows_its_age_not_epoch_milliseconds() -> None:
    line = heartbeat_line(_heartbeat(1_700_000_000_000), now_s=1_700_000_001.2)
    assert "heartbeat 1.2 s ago (" in line and format_time(1_700_000_000) in line
    assert "1700000000000" not in line and "updated_ms" not in line
    assert "queue=2 running=1 free_mem=3072MiB resident=1" in line


# --- `vajra config show` -----------------------------------------------------------------


def _settings(shown: str) -> dict[str, dict[str, object]]:
    return tomllib.loads(shown)


def test_config_show_without_a_cluster_shows_the_defaults(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first == f"# no cluster running in {home}: the defaults, with $VAJRA_HOME"
    expected = VajraConfig().replace("cluster", home=str(home)).to_dict()
    assert _settings(out) == expected

    monkeypatch.setenv("VAJRA_HTTP_ADMIN_KEY", "admin-secret")
    monkeypatch.setenv("VAJRA_EXECUTOR_MAX_BATCH_SIZE", "8")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"# no cluster running in {home}: the defaults, with $VAJRA_EXECUTOR_MAX_BATCH_SIZE, "
        "$VAJRA_HOME, $VAJRA_HTTP_ADMIN_KEY"
    )
    assert _settings(out)["executor"]["max_batch_size"] == 8
    assert _settings(out)["http"]["admin_key"] == "***"
    assert "admin-secret" not in out


def _fake_cluster_file(home: Path, pid: int, config: Path) -> None:
    info = {"gateway_address": "tcp://127.0.0.1:1", "supervisor_pid": pid, "config": str(config)}
    (home / "cluster.json").write_text(json.dumps(info))


def test_config_show_shows_the_running_clusters_settings(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's ``run/cluster.toml`` as its actors read it: no variable of this shell
    applies; secrets masked."""
    running = (
        VajraConfig()
        .replace("cluster", home=str(home), redis_url="redis://:pw-secret@127.0.0.1:7")
        .replace("executor", max_batch_size=5)
        .replace("http", admin_key="admin-secret")
    )
    config = home / "run" / "cluster.toml"
    config.parent.mkdir()
    config.write_text(dump_toml(running))
    _fake_cluster_file(home, os.getpid(), config)  # a live process stands for the supervisor
    monkeypatch.setenv("VAJRA_EXECUTOR_MAX_BATCH_SIZE", "9")
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"# the running cluster's settings, from {config}"
    settings = _settings(out)
    assert settings["executor"]["max_batch_size"] == 5
    assert settings["cluster"]["redis_url"] == "redis://:***@127.0.0.1:7"
    assert settings["http"]["admin_key"] == "***"
    assert "pw-secret" not in out and "admin-secret" not in out

    # --config FILE wins over the running cluster; the shell's variables apply to it.
    other = tmp_path / "other.toml"
    other.write_text("[executor]\nmax_batch_size = 3\n[gateway]\nmax_inflight = 7\n")
    header, cfg = effective_settings(str(other), os.environ)
    assert header == f"# settings from {other}, under the VAJRA_* variables"
    assert (cfg.executor.max_batch_size, cfg.gateway.max_inflight) == (9, 7)


def test_config_show_ignores_a_dead_clusters_file(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = home / "cluster.toml"
    config.write_text("[executor]\nmax_batch_size = 5\n")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    _fake_cluster_file(home, gone.pid, config)  # a supervisor killed outright leaves this
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# no cluster running in {home}: the defaults")
    assert _settings(out)["executor"]["max_batch_size"] == 32


# --- `vajra up`: where the admin key lives ------------------------------------------------


def test_admin_key_note_says_where_never_what(tmp_path: Path) -> None:
    runtime = tmp_path / "run" / "cluster.toml"
    off = admin_key_note(VajraConfig(), config_file=None, env={}, runtime_file=runtime)
    assert off == (
        "admin key: none, so the admin routes are off "
        "(set VAJRA_HTTP_ADMIN_KEY before `vajra up` to turn them on)"
    )
    keyed = VajraConfig().replace("http", admin_key="k-secret")
    from_env = admin_key_note(
        keyed, config_file="my.toml", env={"VAJRA_HTTP_ADMIN_KEY": "k-secret"}, runtime_file=runtime
    )
    assert from_env == (
        f"admin key: $VAJRA_HTTP_ADMIN_KEY (the cluster's copy: http.admin_key in {runtime})"
    )
    from_file = admin_key_note(keyed, config_file="my.toml", env={}, runtime_file=runtime)
    assert from_file.startswith("admin key: http.admin_key in my.toml (")
    assert "k-secret" not in from_env + from_file


# --- commands on a real Valkey ----------------------------------------------------------


def test_tenant_create_key_only_prints_just_a_working_key(
    home: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VAJRA_REDIS_URL", valkey_url)
    name = f"cli-{os.getpid()}-{time.monotonic_ns()}"
    assert main(["tenant", "create", name, "--key-only"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    with ClusterState(valkey_url) as state:
        tenant = state.api_keys.authenticate(out.strip())
    assert tenant is not None and tenant.name == name


def test_status_prints_heartbeat_ages(
    home: Path, valkey_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VAJRA_REDIS_URL", valkey_url)
    beat = replace(_heartbeat(int(time.time() * 1000)), executor_id=f"exec-cli-{os.getpid()}")
    with ClusterState(valkey_url) as state:
        state.heartbeats.write(beat, ttl_s=30)
    assert main(["status"]) == 0  # no cluster.json: no gateway to ask for counters
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if beat.executor_id in ln]
    assert re.search(r"heartbeat \d+\.\d s ago \(\d{4}-\d\d-\d\dT", line), line
    assert str(beat.updated_ms) not in out
