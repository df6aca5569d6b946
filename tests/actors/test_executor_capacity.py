"""A real executor holds exactly ``max_batch_size + max_queue`` requests, the capacity the
scheduler places by: a burst up to it is accepted however many have reached the batch yet,
and the next one is refused as ``overloaded`` (retriable) while every other one completes.

Test rules: ipc sockets in a temp dir, a real Valkey and the tiny model; every I/O step under
``trio.fail_after``.
"""

from __future__ import annotations

from pathlib import Path

import trio
import zmq

from tests.actors.inbox import Inbox
from tests.inprocess import inprocess_config
from vajra.actors.base import now_ms
from vajra.actors.executor import Executor
from vajra.bus.codec import decode, encode
from vajra.bus.messages import ErrorReply, ExecutorHello, InferResult, InferWork, Sampling
from vajra.bus.zsocket import open_socket
from vajra.state import ClusterState


def _work(rid: str) -> InferWork:
    return InferWork(
        request_id=rid,
        tenant_id="t_cap",
        prompt="Once upon a time",
        adapter=None,
        # EOS cannot end one early (the test also holds every step until the fourth is read).
        sampling=Sampling(max_tokens=400, ignore_eos=True),
        stream=False,
        deadline_unix_ms=now_ms() + 60_000,
        gateway_id="gw",
    )


async def test_a_burst_fills_batch_and_queue_and_the_next_is_overloaded(
    tmp_path: Path, valkey_url: str, tiny_model_dir: Path
) -> None:
    cfg = (
        inprocess_config(tmp_path / "run", valkey_url, model=str(tiny_model_dir))
        .replace("storage", local_dir=str(tmp_path / "objects"))
        .replace("executor", max_batch_size=2, max_queue=1)
    )
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    state = ClusterState(valkey_url)
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                dispatch = open_socket(ctx, zmq.ROUTER, handover=True)
                dispatch.bind(cfg.cluster.scheduler_dispatch_address)
                replies = open_socket(ctx, zmq.ROUTER, handover=True)
                replies.bind(cfg.cluster.gateway_backend_address)
                executor = Executor(cfg, state, executor_id="exec-cap")
                await nursery.start(executor.run)
                assert isinstance(decode((await dispatch.recv())[1:]).message, ExecutorHello)
                # Four back to back while no engine step can run (the test holds the GPU's
                # limiter), so none can finish before the fourth is read, however loaded the
                # machine: the fourth must be refused.
                await executor._gpu.acquire()
                rids = ("r1", "r2", "r3", "r4")
                await dispatch.send_each([[b"exec-cap", *encode(_work(r))] for r in rids])
                inbox = Inbox(replies, routed=True)
                answers: dict[str, object] = {}

                async def collect(until: int) -> None:
                    while len(answers) < until:
                        msg = await inbox.next()
                        rid = getattr(msg, "request_id", None)
                        if isinstance(msg, InferResult | ErrorReply) and rid is not None:
                            answers[rid] = msg

                with trio.move_on_after(20):  # a refusal comes at once; an acceptance never
                    await collect(1)
                executor._gpu.release()
                await collect(4)
                assert all(isinstance(answers[r], InferResult) for r in ("r1", "r2", "r3"))
                refused = answers["r4"]
                assert isinstance(refused, ErrorReply)
                assert refused.code == "overloaded" and refused.retriable
                assert executor.counters["overloaded"] == 1
                nursery.cancel_scope.cancel()
    finally:
        state.close()
        ctx.destroy(linger=0)
