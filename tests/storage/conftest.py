"""Fixtures for the object-store tests: a real SeaweedFS S3 server on loopback.

Rules: loopback only, free ports, no fakes; every async test runs under ``trio.fail_after``.
The server is started once per module and killed at the end; a test that kills it starts
it again before returning.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.storage.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedS3, seaweed
from vajra.storage import S3ObjectStore

__all__ = ["s3_store", "seaweed"]  # seaweed: the session's S3 server fixture


def s3_store(server: SeaweedS3, bucket: str | None = None, **kw: float) -> S3ObjectStore:
    return S3ObjectStore(
        bucket=bucket or f"vajra-{uuid.uuid4().hex[:12]}",
        endpoint=server.endpoint,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def s3(seaweed: SeaweedS3) -> Iterator[S3ObjectStore]:
    """A store on a fresh bucket of the shared server."""
    store = s3_store(seaweed)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def local_root(tmp_path: Path) -> Path:
    return tmp_path / "objects"
