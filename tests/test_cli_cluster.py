"""The ``vajra`` command line against a real cluster (`vajra up` on free loopback ports):
what `vajra up` says of the admin key, and `status`, `config show` and `infer -v` output.

Rules: loopback only; every wait bounded; the cluster is stopped with SIGTERM at the end and
must exit 0, leaving no process behind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.e2e.harness import (
    RunningCluster,
    cluster_pids,
    launch_up,
    stop_cluster,
    wait_gone,
    wait_ready,
)

#: Starting takes seconds on an idle machine; a loaded 2-core one can take minutes.
READY_TIMEOUT_S = 420.0
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningCluster]:
    tmp = tmp_path_factory.mktemp("cli-cluster")
    home, config, log_path = tmp / "home", tmp / "vajra.toml", tmp / "cluster.log"
    config.write_text("[http]\nenabled = false\n")
    proc = launch_up(home, tiny_model_dir, log_path, config=config)
    try:
        info = wait_ready(proc, home, log_path, timeout=READY_TIMEOUT_S)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        raise
    c = RunningCluster(home, tiny_model_dir, proc, info, log_path)
    try:
        yield c
    finally:
        if proc.poll() is None:
            stop_cluster(c)
        leftovers, _ = wait_gone(cluster_pids(home), timeout=10.0)
        assert not leftovers, f"processes left running: {leftovers}"


def test_up_says_the_admin_routes_are_off_without_a_key(cluster: RunningCluster) -> None:
    assert (
        "vajra: admin key: none, so the admin routes are off "
        "(set VAJRA_HTTP_ADMIN_KEY before `vajra up` to turn them on)"
    ) in cluster.log()


def test_status_times_are_for_people(cluster: RunningCluster) -> None:
    out = cluster.cli("status")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^gateway  \S+  \(ready since \d{4}-\d\d-\d\dT.* ago\)$", out.stdout, re.M)
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("  exec-0 ")]
    assert re.search(r" heartbeat \d+\.\d s ago \(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line), line
    assert "updated_ms" not in out.stdout
    assert not re.search(r"\b1\d{12}\b", out.stdout)  # no epoch milliseconds


def test_config_show_names_the_running_clusters_file(cluster: RunningCluster) -> None:
    out = cluster.cli("config", "show")
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first == f"# the running cluster's settings, from {cluster.config_path}"
    assert f'model = "{cluster.model_dir}"' in out.stdout
    assert "enabled = false" in out.stdout  # the cluster's [http], not the default
    password = urlsplit(cluster.redis_url).password
    assert password and password not in out.stdout


def test_infer_verbose_prints_the_usage(cluster: RunningCluster) -> None:
    key = cluster.create_tenant("verbose")[1]
    for stream in ([], ["--stream"]):
        out = cluster.cli("infer", "--key", key, "--max-tokens", "3", "-v", *stream, "hello")
        assert out.returncode == 0, out.stderr
        usage = json.loads(out.stderr.strip().splitlines()[-1])
        assert usage["completion_tokens"] >= 1 and usage["gpu_ms"] > 0
