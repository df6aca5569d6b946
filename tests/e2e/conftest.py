"""A real cluster for end-to-end tests: `vajra up` in a subprocess, on free loopback ports.

Test rules: loopback only; every wait bounded; the cluster is stopped with SIGTERM at the end
and must exit 0 within 10 s, leaving no process behind (actors, embedded Valkey, reaper).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import RunningCluster, cluster_pids, start_cluster, stop_cluster, wait_gone


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningCluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    c = start_cluster(
        tmp,
        tiny_model_dir,
        config_text="[gateway]\nmax_prompt_chars = 2000\nmax_tokens_limit = 512\n[http]\nenabled = false\n",
    )
    try:
        yield c
    finally:
        if c.process.poll() is None:
            elapsed = stop_cluster(c)
            assert elapsed < 10.0, f"shutdown took {elapsed:.1f}s"
        leftovers, _ = wait_gone(cluster_pids(c.home), timeout=5.0)
        assert not leftovers, f"processes left running: {leftovers}"
