"""Training datasets named by ``s3://`` URI, read by a real gateway from a real S3 server.

The cluster's object store is SeaweedFS (S3 on loopback). A tenant uploads its dataset under
its own prefix of the cluster's bucket and submits a job by URI: the gateway reads it (bounded:
an object over ``training.max_dataset_bytes`` is refused before it is read whole), checks it
like an uploaded file and stores it with the job. Another tenant naming that URI, an object
that is not there, another bucket and an oversized object are refused with typed errors
naming ``dataset_uri``, and nothing is queued.

Test rules: loopback only; every test under ``trio.fail_after``; no scheduler or executor.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import trio

from tests.inprocess import inprocess_config
from tests.storage.conftest import s3_store
from tests.storage.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedS3, seaweed
from vajra.actors.gateway import Gateway
from vajra.client import AsyncClient
from vajra.errors import InvalidRequest, PayloadTooLarge
from vajra.state import ClusterState

__all__ = ["seaweed"]  # the session's S3 server fixture

MAX_BYTES = 4_096
PAIRS = [{"prompt": f"Q{i}:", "completion": f" answer {i}"} for i in range(20)]
GOOD = "\n".join(json.dumps(p) for p in PAIRS).encode()


async def test_a_job_trains_on_a_dataset_named_by_s3_uri(
    tmp_path: Path, valkey_url: str, tiny_model_dir: Path, seaweed: SeaweedS3
) -> None:
    bucket = f"vajra-{uuid.uuid4().hex[:12]}"
    cfg = (
        inprocess_config(tmp_path / "run", valkey_url, model=str(tiny_model_dir))
        .replace("training", max_dataset_bytes=MAX_BYTES, max_examples=100)
        .replace("executor", max_model_len=64)
        .replace(
            "storage",
            kind="s3",
            s3_endpoint=seaweed.endpoint,
            s3_bucket=bucket,
            s3_access_key_id=ACCESS_KEY,
            s3_secret_access_key=SECRET_KEY,
        )
    )
    store = s3_store(seaweed, bucket)
    try:
        with ClusterState(valkey_url) as state, trio.fail_after(120):
            suffix = uuid.uuid4().hex[:8]  # the session's Valkey is shared: names must be new
            t1, k1 = state.tenants.create(f"s3-one-{suffix}")
            t2, k2 = state.tenants.create(f"s3-two-{suffix}")
            mine = f"datasets/{t1.tenant_id}/uploads/train.jsonl"
            big = f"datasets/{t1.tenant_id}/uploads/big.jsonl"
            await store.aput(mine, GOOD)
            await store.aput(big, b'{"text": "' + b"x" * (MAX_BYTES + 10) + b'"}')
            async with trio.open_nursery() as nursery:
                gw = Gateway(cfg, state)
                address = await nursery.start(gw.run)
                async with (
                    AsyncClient(address, k1, timeout_s=60) as c,
                    AsyncClient(address, k2, timeout_s=60) as other,
                ):
                    refusals = [
                        (other, f"s3://{bucket}/{mine}", InvalidRequest, "prefix"),
                        (
                            c,
                            f"s3://{bucket}/datasets/{t1.tenant_id}/none.jsonl",
                            InvalidRequest,
                            "does not exist",
                        ),
                        (c, f"s3://another-bucket/{mine}", InvalidRequest, "bucket"),
                        (c, f"s3://{bucket}/{big}", PayloadTooLarge, "over the limit"),
                    ]
                    for client, uri, error, needle in refusals:
                        with pytest.raises(error) as e:
                            await client.train("fresh-one", uri, fresh=True, rank=4, max_steps=2)
                        assert e.value.field == "dataset_uri" and needle in e.value.message
                    assert state.jobs.list(t1.tenant_id) == state.jobs.list(t2.tenant_id) == []
                    job = await c.train(
                        "fresh-one", f"s3://{bucket}/{mine}", fresh=True, rank=4, batch_size=4
                    )
                    info = job.last
                    assert info is not None and info.status == "queued"
                    assert info.total_steps == 5  # 20 examples, 4 per step, 1 epoch
                    # The job's own copy of the dataset sits in the same store, byte for byte.
                    [rec] = state.jobs.list(t1.tenant_id)
                    assert rec.dataset_key != mine
                    assert await store.aget(rec.dataset_key) == GOOD
                nursery.cancel_scope.cancel()
    finally:
        store.close()
