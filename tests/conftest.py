"""Session-wide fixtures shared by every test package: a real Valkey server, a tiny model.

Rules: loopback only, free ports chosen at start, no fakes. The null cluster is imported where
its fixture runs: it pulls in the whole stack (HTTP bridge, ZeroMQ), which ``make gpu-check``
does not carry to the GPU machine for ``tests/gpu``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from vajra.gpu.tiny import init_tiny_model
from vajra.state import EmbeddedValkey

if TYPE_CHECKING:
    from tests.null_cluster import NullCluster


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random-weight Llama and trained tokenizer, written as a real model directory."""
    return init_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", seed=0)


@pytest.fixture(scope="session")
def null_cluster_running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NullCluster]:
    """A model-less cluster with the HTTP bridge, in a thread (see :mod:`tests.null_cluster`)."""
    from tests.null_cluster import null_cluster

    with null_cluster(tmp_path_factory.mktemp("null-cluster")) as cluster:
        yield cluster


@pytest.fixture
def raw(valkey_url: str) -> Iterator[redis.Redis[str]]:
    """A plain client on a freshly flushed database, for looking behind the API."""
    client: redis.Redis[str] = redis.Redis.from_url(valkey_url, decode_responses=True)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()
