"""AsyncClient against a fake gateway (see fake_gateway.py for what each prompt does).

Test rules: loopback only; the gateway binds port 0 (``tcp://127.0.0.1:0``); every test body
runs under ``trio.fail_after``; the fake clock where only a timeout is being waited for.
"""

from __future__ import annotations

import builtins
import random
from typing import Any

import pytest
import trio
import trio.testing
from fake_gateway import FakeGateway, echo_pieces, echo_text

from vajra.bus.zsocket import Context, new_context
from vajra.client import (
    AsyncClient,
    AuthError,
    InferenceResult,
    InternalError,
    InvalidRequest,
    NotFoundError,
    OverloadedError,
    PayloadTooLarge,
    ProtocolError,
    StreamChunk,
    TimeoutError,
    UnavailableError,
    Usage,
    VajraError,
)
from vajra.errors import ErrorCode

LIMIT_S = 10


async def test_infer_returns_the_result_and_sends_the_request_fields(
    gateway: FakeGateway,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "key-1", tenant="acme", timeout_s=7.5) as c:
            result = await c.infer("hello world", adapter="sql@2", max_tokens=9, stop="\n", seed=3)
    assert isinstance(result, InferenceResult)
    assert result.text == echo_text("hello world")
    assert result.finish_reason == "stop"
    assert result.executor_id == "exec-fake"
    assert result.usage == Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5, gpu_ms=1.5)
    (sent,) = gateway.requests
    assert sent.request_id == result.request_id and len(sent.request_id) == 32
    assert (sent.api_key, sent.tenant, sent.adapter) == ("key-1", "acme", "sql@2")
    s = sent.sampling
    assert (s.max_tokens, s.stop, s.seed, sent.stream) == (9, ("\n",), 3, False)
    assert sent.deadline_ms == 7500


async def test_per_call_timeout_is_sent_as_the_deadline(gateway: FakeGateway) -> None:
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k") as c:
            await c.infer("a", timeout_s=2.25)
            await c.infer("b")
    assert [r.deadline_ms for r in gateway.requests] == [2250, 30_000]


async def test_stream_yields_every_chunk_then_a_final_one(gateway: FakeGateway) -> None:
    prompt = "one two three four"
    with trio.fail_after(LIMIT_S):
        async with (
            AsyncClient(gateway.address, "k") as c,
            c.stream(prompt, max_tokens=32) as chunks,
        ):
            got = [chunk async for chunk in chunks]
            assert chunks.text == echo_text(prompt)
    pieces = echo_pieces(prompt)
    assert all(isinstance(ch, StreamChunk) for ch in got)
    assert [ch.text for ch in got[:-1]] == pieces
    assert [ch.index for ch in got] == list(range(len(pieces) + 1))
    assert all(ch.finish_reason is None and ch.usage is None for ch in got[:-1])
    final = got[-1]
    assert final.is_final and final.finish_reason == "stop"
    assert final.text == "" and final.token_ids == []
    assert final.usage is not None and final.usage.completion_tokens == len(pieces)
    assert gateway.requests[0].stream is True


@pytest.mark.parametrize(
    ("prompt", "exc_type", "field", "retriable"),
    [
        ("!auth", AuthError, None, False),
        ("!overload", OverloadedError, None, True),
        ("!invalid", InvalidRequest, "max_tokens", False),
        ("!code:not_found", NotFoundError, None, False),
        ("!code:unavailable", UnavailableError, None, True),
        ("!code:timeout", TimeoutError, None, True),
        ("!code:payload_too_large", PayloadTooLarge, None, False),
        ("!code:malformed_frame", ProtocolError, None, False),
        ("!code:internal", InternalError, None, False),
        ("!code:no_such_code", InternalError, None, False),
    ],
)
async def test_error_replies_raise_the_typed_error(
    gateway: FakeGateway,
    prompt: str,
    exc_type: type[VajraError],
    field: str | None,
    retriable: bool,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k") as c:
            with pytest.raises(exc_type) as info:
                await c.infer(prompt)
            assert info.value.field == field
            assert info.value.retriable is retriable
            # The same error ends a stream, and the client keeps working afterwards.
            with pytest.raises(exc_type):
                async with c.stream(prompt) as chunks:
                    async for _ in chunks:
                        pass
            assert (await c.infer("still fine")).text == echo_text("still fine")


async def test_a_silent_gateway_times_out(
    gateway: FakeGateway, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(LIMIT_S * 10):
        async with AsyncClient(gateway.address, "k", timeout_s=30) as c:
            start = trio.current_time()
            with pytest.raises(TimeoutError) as info:
                await c.infer("!silent")
            assert trio.current_time() - start == pytest.approx(30)
            assert isinstance(info.value, builtins.TimeoutError)
            assert info.value.code is ErrorCode.TIMEOUT and info.value.retriable
            with pytest.raises(builtins.TimeoutError):
                async with c.stream("!silent", timeout_s=5) as chunks:
                    async for _ in chunks:
                        pass


async def test_a_late_reply_after_a_timeout_is_ignored(gateway: FakeGateway) -> None:
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k") as c:
            with pytest.raises(TimeoutError):
                await c.infer("!delay:200", timeout_s=0.05)
            while not c.ignored_replies:  # noqa: ASYNC110 - counted by the client's receiver
                await trio.sleep(0.02)
            await trio.sleep(0.1)  # and nothing else arrives
            assert c.ignored_replies == 1
            assert (await c.infer("next")).text == echo_text("next")


async def test_fifty_concurrent_requests_are_routed_by_request_id(
    gateway: FakeGateway,
) -> None:
    results: dict[int, str] = {}
    streamed: dict[int, str] = {}

    async def one(c: AsyncClient, i: int) -> None:
        if i % 5 == 0:
            async with c.stream(f"stream {i} a b c") as chunks:
                streamed[i] = "".join([ch.text async for ch in chunks])
        else:
            results[i] = (await c.infer(f"prompt {i}")).text

    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k") as c, trio.open_nursery() as nursery:
            order = list(range(50))
            random.Random(1).shuffle(order)
            for i in order:
                nursery.start_soon(one, c, i)
    assert results == {i: echo_text(f"prompt {i}") for i in range(50) if i % 5}
    assert streamed == {i: echo_text(f"stream {i} a b c") for i in range(0, 50, 5)}
    assert len(gateway.reply_order) == 50
    assert gateway.reply_order != [r.request_id for r in gateway.requests]  # really shuffled


async def test_garbage_from_the_gateway_is_ignored(gateway: FakeGateway) -> None:
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k") as c:
            result = await c.infer("!garbage")
            assert result.text == echo_text("!garbage")
            assert c.ignored_replies == 6
            assert (await c.infer("after")).text == echo_text("after")


async def test_a_mangled_reply_fails_its_own_request_at_once(gateway: FakeGateway) -> None:
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k", timeout_s=60) as c:
            with pytest.raises(ProtocolError) as info:
                await c.infer("!badreply")
            assert info.value.field in {"text", "token_ids"}
            assert (await c.infer("after")).text == echo_text("after")


async def test_a_stream_flooding_its_queue_fails_with_protocol_error(
    gateway: FakeGateway,
) -> None:
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k") as c:
            got: list[StreamChunk] = []
            with pytest.raises(ProtocolError):
                async with c.stream("!flood", max_tokens=4) as chunks:
                    await trio.sleep(0.3)  # let every chunk arrive before reading
                    async for chunk in chunks:
                        got.append(chunk)
            assert 0 < len(got) <= 4 + 8
            assert (await c.infer("after")).text == echo_text("after")


async def test_breaking_out_of_a_stream_abandons_it(gateway: FakeGateway) -> None:
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k") as c:
            async with c.stream("a b c d e f g h") as chunks:
                async for _ in chunks:
                    break
            assert (await c.infer("after")).text == echo_text("after")


async def test_stats_returns_the_counters(gateway: FakeGateway) -> None:
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k") as c:
            await c.infer("x")
            assert await c.stats() == {"requests": 1, "stats": 1}


async def test_closing_fails_outstanding_requests_with_unavailable(
    gateway: FakeGateway,
) -> None:
    errors: list[BaseException] = []

    async def wait_forever(c: AsyncClient) -> None:
        try:
            await c.infer("!silent")
        except UnavailableError as exc:
            errors.append(exc)

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery, AsyncClient(gateway.address, "k") as c:
            nursery.start_soon(wait_forever, c)
            await gateway.request_seen.wait()
        assert len(errors) == 1
        with pytest.raises(UnavailableError):
            await c.infer("closed")


async def test_misuse_is_reported_clearly(gateway: FakeGateway) -> None:
    with trio.fail_after(LIMIT_S):
        c = AsyncClient(gateway.address, "k")
        with pytest.raises(RuntimeError, match="async with"):
            await c.infer("not open yet")
        async with c:
            with pytest.raises(InvalidRequest) as info:
                await c.infer("x", timeout_s=0)
            assert info.value.field == "timeout_s"
            with pytest.raises(RuntimeError, match="enter the stream"):
                await c.stream("x").__anext__()
        with pytest.raises(InvalidRequest):
            AsyncClient(gateway.address, "k", timeout_s=-1)


#: Arguments any gateway refuses, and the field its InvalidRequest names: the client refuses
#: them itself (vajra.policies.request_rules), before anything is sent.
BAD_ARGUMENTS = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": ""}, "stop"),
    ({"stop": ["ok", ""]}, "stop"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"adapter": ""}, "adapter"),
    ({"adapter": "a" * 129}, "adapter"),
    ({"top_k": -1}, "top_k"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": 5}, "stop_token_ids"),
    ({"min_tokens": 65}, "min_tokens"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}, "response_format"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"params": {"max_tokens": 3}}, "params"),
    ({"unknown_knob": 1}, "unknown_knob"),
]


@pytest.mark.parametrize(("kwargs", "field"), BAD_ARGUMENTS)
async def test_bad_arguments_fail_before_anything_is_sent(
    gateway: FakeGateway, kwargs: dict[str, Any], field: str
) -> None:
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k") as c:
            with pytest.raises(InvalidRequest) as info:
                await c.infer("hi", **kwargs)
            assert info.value.field == field
            with pytest.raises(InvalidRequest) as info:
                c.stream("hi", **kwargs)  # refused when made, not when entered
            assert info.value.field == field
            assert (await c.infer("fine")).text == echo_text("fine")
    assert [r.prompt for r in gateway.requests] == ["fine"]


async def test_a_bad_tenant_fails_before_anything_is_sent(gateway: FakeGateway) -> None:
    with trio.fail_after(LIMIT_S):
        for tenant in ("", "t" * 129):
            async with AsyncClient(gateway.address, "k", tenant=tenant) as c:
                with pytest.raises(InvalidRequest) as info:
                    await c.infer("hi")
                assert info.value.field == "tenant"
                with pytest.raises(InvalidRequest) as info:
                    await c.with_api_key("k2", tenant=tenant).list_adapters()
                assert info.value.field == "tenant"
                async with c.with_api_key("k2", tenant="acme").stream("a b") as chunks:
                    assert "".join([ch.text async for ch in chunks]) == echo_text("a b")
    assert [(r.api_key, r.tenant) for r in gateway.requests] == [("k2", "acme")] * 2


async def test_a_bad_address_is_refused_naming_it() -> None:
    with trio.fail_after(LIMIT_S):
        c = AsyncClient("nonsense://nowhere", "k")
        with pytest.raises(InvalidRequest) as info:
            async with c:
                pass
        assert info.value.field == "address"
        with pytest.raises(UnavailableError):
            await c.infer("x")


async def test_errors_leave_the_client_block_unwrapped(gateway: FakeGateway) -> None:
    with trio.fail_after(LIMIT_S):
        with pytest.raises(AuthError):
            async with AsyncClient(gateway.address, "k") as c:
                await c.infer("!auth")
        with pytest.raises(KeyError):
            async with AsyncClient(gateway.address, "k"):
                raise KeyError("the caller's own error")
        with trio.move_on_after(0.05) as scope:
            async with AsyncClient(gateway.address, "k") as c:
                await c.infer("!silent")
        assert scope.cancelled_caught


async def test_abandoned_generations_are_cancelled_at_the_gateway(gateway: FakeGateway) -> None:
    """A stream left early and a call past its deadline send a cancel (with the key)."""
    with trio.fail_after(LIMIT_S):
        async with AsyncClient(gateway.address, "k") as c:
            async with c.stream("a b c d e f g h") as chunks:
                left_early = chunks.request_id
                async for _ in chunks:
                    break
            with pytest.raises(TimeoutError):
                await c.infer("!silent", timeout_s=0.2)
            timed_out = gateway.requests[-1].request_id
            with trio.move_on_after(0.2):  # the caller gives up (cancellation)
                await c.infer("!silent")
            given_up = gateway.requests[-1].request_id
            await c.infer("finished")  # answered: nothing to cancel
            async with c.stream("a b") as chunks:
                async for _ in chunks:
                    pass
            with pytest.raises(AuthError):  # the gateway's error is an answer too
                await c.infer("!auth")
            while len(gateway.cancels) < 3:  # noqa: ASYNC110 - the fake gateway's list
                await trio.sleep(0.01)
            await trio.sleep(0.1)  # and no more come
            assert [(m.request_id, m.api_key) for m in gateway.cancels] == [
                (left_early, "k"),
                (timed_out, "k"),
                (given_up, "k"),
            ]
            assert c.cancels_sent == 3


async def test_a_dropped_gateway_fails_outstanding_calls_at_once() -> None:
    """Calls in flight when the gateway dies fail fast and retriably, not at their deadline."""
    ctx: Context[Any] = new_context()
    doomed = FakeGateway(ctx)
    errors: list[VajraError] = []
    stop_gateway = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        with stop_gateway:
            await doomed.run(task_status=task_status)

    async def call(c: AsyncClient, kind: str) -> None:
        try:
            if kind == "stream":
                async with c.stream("!silent") as chunks:
                    async for _ in chunks:
                        pass
            else:
                await c.infer("!silent")
        except VajraError as exc:
            errors.append(exc)

    try:
        with trio.fail_after(LIMIT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(serve)
                async with AsyncClient(doomed.address, "k", timeout_s=60) as c:
                    await c.infer("warm up")  # connected
                    t0 = trio.current_time()
                    async with trio.open_nursery() as callers:
                        callers.start_soon(call, c, "infer")
                        callers.start_soon(call, c, "stream")
                        while len(doomed.requests) < 3:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                        stop_gateway.cancel()  # the gateway goes away
                    elapsed = trio.current_time() - t0
                    assert c.disconnects >= 1
    finally:
        ctx.term()
    assert len(errors) == 2 and all(isinstance(e, UnavailableError) for e in errors)
    assert all(e.retriable for e in errors)
    assert elapsed < 10  # not the 60 s deadline
