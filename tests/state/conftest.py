"""Fixtures for the cluster-state tests, on the session's real Valkey (tests/conftest.py).

Rules: loopback only, a free port chosen at start, no fakes; every test starts from an
empty database (FLUSHDB); every async test runs under ``trio.fail_after``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from vajra.state import ClusterState, EmbeddedValkey


@pytest.fixture
def state(valkey_url: str, raw: redis.Redis[str]) -> Iterator[ClusterState]:
    with ClusterState(valkey_url) as cs:
        yield cs


@pytest.fixture
def stopped_url(tmp_path: Path) -> str:
    """The URL of a Valkey server that was started and then stopped."""
    server = EmbeddedValkey(tmp_path / "gone")
    url = server.start()
    server.stop()
    return url
