"""End to end: a stream whose executor is killed with SIGKILL mid-generation is billed for
what it was sent.

A real cluster (`vajra up`, one executor on the tiny model). A client streams a long answer;
once it has read :data:`READ_BEFORE_KILL` tokens the executor is killed with SIGKILL, and the
client's stream ends with a retriable error. The supervisor restarts the executor, whose new
incarnation recovers the journal: the stream's last progress record becomes its usage event.
Checked: the ledger bills the tenant exactly one request, with at least the completion tokens
the client received and the GPU time the journal holds for it, rounded up to the
granularity; the other tenant is billed nothing.

Test rules: loopback only; every wait bounded (``trio.fail_after``, subprocess timeouts).
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import trio

from tests.e2e.harness import RunningCluster, pgrep, start_cluster, stop_cluster
from vajra.actors.usage_journal import read_segments, segments
from vajra.client import AsyncClient, VajraError
from vajra.state import ClusterState

pytestmark = pytest.mark.e2e

GRANULARITY_MS = 10
READ_BEFORE_KILL = 12
CONFIG = f"""
[http]
enabled = false
[executor]
usage_resend_s = 0.3
keep_usage_journals = true
[policies]
billing_granularity_ms = {GRANULARITY_MS}
"""


@pytest.fixture(scope="module")
def crash_cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    c = start_cluster(tmp_path_factory.mktemp("stream-crash"), tiny_model_dir, config_text=CONFIG)
    try:
        yield c
    finally:
        if c.process.poll() is None:
            stop_cluster(c)


def _executor_pid(cluster: RunningCluster) -> int:
    (pid,) = pgrep(f"actor executor --config {cluster.home}/run/cluster.toml")
    return pid


async def test_a_stream_cut_short_by_an_executor_kill_is_billed_what_it_was_sent(
    crash_cluster: RunningCluster,
) -> None:
    cluster = crash_cluster
    (streamer, streamer_key), (other, _) = (cluster.create_tenant(n) for n in ("acme", "globex"))
    victim = _executor_pid(cluster)
    received = 0
    with trio.fail_after(120):
        async with AsyncClient(cluster.gateway, streamer_key) as c:
            with pytest.raises(VajraError) as failure:
                async with c.stream(
                    "Once upon a time", max_tokens=400, ignore_eos=True, timeout_s=30
                ) as chunks:
                    async for chunk in chunks:
                        received += len(chunk.token_ids)
                        if received >= READ_BEFORE_KILL and victim:
                            os.kill(victim, signal.SIGKILL)
                            victim = 0
            assert victim == 0, "the stream ended before the kill"
            assert failure.value.retriable, failure.value
            assert received < 400

        # The restarted executor recovers the journal and the ledger bills the stream.
        with ClusterState(cluster.redis_url) as state:
            while True:
                totals = state.usage.get(streamer)
                if totals.requests:
                    break
                await trio.sleep(0.2)
            assert state.usage.get(other).requests == 0
    assert totals.requests == 1
    assert totals.completion_tokens >= received, (totals, received)
    assert totals.prompt_tokens > 0 and totals.gpu_ms > 0, totals

    # What the ledger billed is what the killed incarnation journaled before the chunks left.
    every = read_segments(segments(cluster.home / "usage" / "exec-0", include_done=True))
    (event,) = [e for e in every.events.values() if e.tenant_id == streamer]
    assert event == every.progress_of(event.event_id), "the event is the last progress record"
    assert (event.completion_tokens, event.prompt_tokens) == (
        totals.completion_tokens,
        totals.prompt_tokens,
    )
    assert math.isclose(totals.gpu_ms, event.gpu_ms, rel_tol=1e-6), (totals, event)
    assert totals.billed_ms == math.ceil(event.gpu_ms / GRANULARITY_MS) * GRANULARITY_MS
    assert "usage events of an earlier incarnation" in cluster.full_log()
