"""Raw frames at the gateway (and at an executor): decoding parameters the SDK would refuse
still get a typed answer naming the field, never a crash; and replies too large to carry
their log-probabilities are refused naming them.

Against the session's null cluster (tests/null_cluster.py); the executor test runs its own
model-less executor with raw sockets standing in for the scheduler and the gateway.

Test rules: loopback and ipc only; every receive bounded by a poll timeout or ``fail_after``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import trio
import zmq

from tests.actors.inbox import Inbox
from tests.inprocess import inprocess_config
from tests.null_cluster import NullCluster
from vajra.actors.base import now_ms
from vajra.actors.executor import Executor
from vajra.bus.codec import decode, encode
from vajra.bus.messages import (
    PROTOCOL_VERSION,
    ErrorReply,
    ExecutorHello,
    InferRequest,
    InferResult,
    InferWork,
    Sampling,
    Structured,
    TokenChunk,
)
from vajra.bus.zsocket import open_socket
from vajra.client import Client, InvalidRequest
from vajra.state import ClusterState

POLL_MS = 20_000


@pytest.fixture
def dealer(null_cluster_running: NullCluster) -> Iterator[zmq.Socket[bytes]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(null_cluster_running.gateway)
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


def _answer(sock: zmq.Socket[bytes]) -> object:
    assert sock.poll(POLL_MS)
    return decode(sock.recv_multipart()).message


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (Sampling(top_k=-1), "top_k"),
        (Sampling(stop_token_ids=(2**31,)), "stop_token_ids"),
        (Sampling(stop_token_ids=tuple(range(33))), "stop_token_ids"),
        (Sampling(min_tokens=65), "min_tokens"),
        (Sampling(presence_penalty=float("inf")), "presence_penalty"),
        (Sampling(frequency_penalty=-2.5), "frequency_penalty"),
        (Sampling(repetition_penalty=11.0), "repetition_penalty"),
        (Sampling(logprobs=-1), "logprobs"),
        (Sampling(prompt_logprobs=21), "prompt_logprobs"),
        (Sampling(structured=Structured("json_object", "x")), "response_format"),
        (Sampling(structured=Structured("json_schema", "[]")), "response_format"),
        (Sampling(structured=Structured("json_schema", "[" * 40 + "]" * 40)), "response_format"),
        (Sampling(structured=Structured("lark", "x" * 70_000)), "response_format"),
        (Sampling(structured=Structured("sql", "select")), "response_format"),
        (Sampling(max_tokens=5000), "max_tokens"),  # the cluster's limit (4096)
    ],
)
def test_bad_decoding_values_get_invalid_request_naming_the_field(
    dealer: zmq.Socket[bytes], null_cluster_running: NullCluster, sampling: Sampling, field: str
) -> None:
    c = null_cluster_running
    dealer.send_multipart(encode(InferRequest("bad", c.api_key, "hi", sampling=sampling)))
    reply = _answer(dealer)
    assert isinstance(reply, ErrorReply)
    assert (reply.request_id, reply.code, reply.field) == ("bad", "invalid_request", field)
    # The gateway still serves, on the same connection.
    dealer.send_multipart(encode(InferRequest("good", c.api_key, "hi")))
    assert isinstance(_answer(dealer), InferResult)


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"top_k": "many"}, "top_k"),
        ({"stop_token_ids": ["x"]}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"structured": {"spec": "x"}}, "structured"),  # its kind is missing
        (5, "sampling"),
    ],
)
def test_mistyped_decoding_values_are_malformed_frames_naming_the_field(
    dealer: zmq.Socket[bytes], null_cluster_running: NullCluster, sampling: object, field: str
) -> None:
    header = msgpack.packb([PROTOCOL_VERSION, "infer", "m1", None, None])
    body = {"request_id": "typed", "api_key": null_cluster_running.api_key, "prompt": "hi"}
    dealer.send_multipart([header, msgpack.packb({**body, "sampling": sampling})])
    reply = _answer(dealer)
    assert isinstance(reply, ErrorReply)
    assert (reply.request_id, reply.code, reply.field) == ("typed", "malformed_frame", field)


def test_logprobs_too_large_for_one_reply_are_refused_naming_them(
    dealer: zmq.Socket[bytes], null_cluster_running: NullCluster
) -> None:
    """4,000 prompt tokens with 20 alternatives each do not fit in a 1 MiB reply: the
    executor answers InvalidRequest instead of a reply nobody could decode."""
    c = null_cluster_running
    prompt = "p" * 4000
    for stream in (False, True):
        sampling = Sampling(max_tokens=2, prompt_logprobs=20)
        dealer.send_multipart(
            encode(InferRequest("big", c.api_key, prompt, sampling=sampling, stream=stream))
        )
        reply = _answer(dealer)
        assert isinstance(reply, ErrorReply), reply
        assert (reply.code, reply.field) == ("invalid_request", "prompt_logprobs")
    # A stream's completion logprobs travel a step at a time: any number of them fits.
    sampling = Sampling(max_tokens=300, ignore_eos=True, logprobs=20)
    dealer.send_multipart(
        encode(InferRequest("long", c.api_key, "x", sampling=sampling, stream=True))
    )
    tokens = 0
    while not isinstance(reply := _answer(dealer), InferResult):
        assert isinstance(reply, TokenChunk)
        assert len(reply.logprobs) == len(reply.token_ids)  # each chunk carries its own
        tokens += len(reply.token_ids)
    assert tokens == 300
    with Client(c.gateway, c.api_key, timeout_s=20) as client:
        with pytest.raises(InvalidRequest) as info:
            client.infer(prompt, max_tokens=1, prompt_logprobs=20)
        assert info.value.field == "prompt_logprobs"
        # The SDK reads results with logprobs as streams, so a long one arrives whole.
        r = client.infer("x", max_tokens=300, ignore_eos=True, logprobs=20)
        assert len(r.logprobs) == 300 and len(r.logprobs[0].top) == 20


async def test_the_executor_checks_the_work_it_is_sent(tmp_path: Path, valkey_url: str) -> None:
    """Work the gateway should have refused is answered by the executor's intake with the same
    typed error (it builds the engine's SamplingParams), and the executor keeps serving."""
    cfg = inprocess_config(tmp_path / "run", valkey_url)

    def work(rid: str, sampling: Sampling) -> InferWork:
        return InferWork(rid, "t_1", "p", None, sampling, False, now_ms() + 60_000, "gw")

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with trio.fail_after(20), ClusterState(valkey_url) as state:
        async with trio.open_nursery() as nursery:
            dispatch = open_socket(ctx, zmq.ROUTER, handover=True)
            dispatch.bind(cfg.cluster.scheduler_dispatch_address)
            replies = open_socket(ctx, zmq.ROUTER, handover=True)
            replies.bind(cfg.cluster.gateway_backend_address)
            replies_in = Inbox(replies, routed=True)
            await nursery.start(Executor(cfg, state, executor_id="exec-w", model="null").run)
            assert isinstance(decode((await dispatch.recv())[1:]).message, ExecutorHello)
            for rid, sampling, field in [
                ("w1", Sampling(top_k=-5), "top_k"),
                ("w2", Sampling(structured=Structured("regex", "")), "response_format"),
                ("w3", Sampling(min_tokens=100), "min_tokens"),
            ]:
                await dispatch.send([b"exec-w", *encode(work(rid, sampling))])
                msg = await replies_in.next()
                assert isinstance(msg, ErrorReply) and msg.request_id == rid
                assert (msg.code, msg.field) == ("invalid_request", field)
            await dispatch.send([b"exec-w", *encode(work("ok", Sampling(max_tokens=2)))])
            msg = await replies_in.next()
            assert isinstance(msg, InferResult) and msg.request_id == "ok"
            nursery.cancel_scope.cancel()
    ctx.destroy(linger=0)
