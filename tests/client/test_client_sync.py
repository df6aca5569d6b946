"""The blocking Client against a fake gateway running in its own thread (its own trio.run).

Test rules: loopback only; the gateway binds port 0 (``tcp://127.0.0.1:0``); these tests are
synchronous, so instead of ``trio.fail_after`` every call has a client timeout of a few
seconds and every thread is joined with a timeout.
"""

from __future__ import annotations

import builtins
import threading
import time
from typing import Any

import pytest
from fake_gateway import FakeGateway, echo_pieces, echo_text, gateway_in_thread

from vajra.client import (
    AuthError,
    Client,
    InferenceResult,
    InvalidRequest,
    OverloadedError,
    ProtocolError,
    StreamChunk,
    TimeoutError,
    UnavailableError,
)

TIMEOUT_S = 5.0


def test_infer_and_stream(thread_gateway: FakeGateway) -> None:
    with Client(thread_gateway.address, "k", tenant="acme", timeout_s=TIMEOUT_S) as c:
        result = c.infer("hello there", max_tokens=5, stop=["\n"])
        chunks = list(c.stream("a b c"))
        assert c.stats() == {"requests": 2, "stats": 1}
    assert isinstance(result, InferenceResult)
    assert result.text == echo_text("hello there")
    assert result.usage.total_tokens == 2 + 3
    assert all(isinstance(ch, StreamChunk) for ch in chunks)
    assert [ch.text for ch in chunks[:-1]] == echo_pieces("a b c")
    assert chunks[-1].finish_reason == "stop" and chunks[-1].usage is not None
    first, second = thread_gateway.requests
    sent = (first.tenant, first.sampling.max_tokens, first.sampling.stop, first.stream)
    assert sent == ("acme", 5, ("\n",), False)
    assert second.stream and second.deadline_ms == 5000


def test_error_replies_raise_the_typed_error(thread_gateway: FakeGateway) -> None:
    with Client(thread_gateway.address, "k", timeout_s=TIMEOUT_S) as c:
        with pytest.raises(AuthError):
            c.infer("!auth")
        with pytest.raises(OverloadedError) as overloaded:
            c.infer("!overload")
        assert overloaded.value.retriable
        with pytest.raises(InvalidRequest) as invalid:
            list(c.stream("!invalid"))
        assert invalid.value.field == "max_tokens"
        with pytest.raises(ProtocolError):
            c.infer("!badreply")


def test_a_silent_gateway_times_out_and_the_late_reply_is_ignored(
    thread_gateway: FakeGateway,
) -> None:
    with Client(thread_gateway.address, "k", timeout_s=TIMEOUT_S) as c:
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            c.infer("!silent", timeout_s=0.2)
        assert 0.15 < time.monotonic() - start < 2
        assert isinstance(info.value, builtins.TimeoutError)
        assert thread_gateway.requests[0].deadline_ms == 200
        with pytest.raises(builtins.TimeoutError):
            c.infer("!delay:200", timeout_s=0.05)
        deadline = time.monotonic() + 30
        while len(thread_gateway.requests) < 2:  # the gateway has the delayed request
            assert time.monotonic() < deadline, "the delayed request never arrived"
            time.sleep(0.02)
        late = thread_gateway.requests[1].request_id
        while late not in thread_gateway.reply_order:  # and has answered it
            assert time.monotonic() < deadline, "the delayed reply was never sent"
            time.sleep(0.02)
        time.sleep(0.05)  # and the reply has crossed the socket before the next request
        assert c.infer("next").text == echo_text("next")
        assert c.ignored_replies == 1


def test_garbage_from_the_gateway_is_ignored(thread_gateway: FakeGateway) -> None:
    with Client(thread_gateway.address, "k", timeout_s=TIMEOUT_S) as c:
        assert c.infer("!garbage").text == echo_text("!garbage")
        assert c.ignored_replies == 6
        assert c.infer("after").text == echo_text("after")


def test_one_thread_can_infer_while_iterating_a_stream(thread_gateway: FakeGateway) -> None:
    with Client(thread_gateway.address, "k", timeout_s=TIMEOUT_S) as c:
        texts, inner = [], []
        for chunk in c.stream("w x y z"):
            texts.append(chunk.text)
            if chunk.index < 2:
                inner.append(c.infer(f"inner {chunk.index}").text)
        assert "".join(texts) == echo_text("w x y z")
        assert inner == [echo_text("inner 0"), echo_text("inner 1")]


def test_eight_threads_share_one_client(thread_gateway: FakeGateway) -> None:
    n_threads, per_thread = 8, 6
    barrier = threading.Barrier(n_threads)
    failures: list[BaseException] = []
    got: dict[str, str] = {}

    def work(t: int) -> None:
        try:
            barrier.wait(timeout=TIMEOUT_S)
            for i in range(per_thread):
                prompt = f"thread {t} call {i}"
                if i % 3 == 0:
                    got[prompt] = "".join(ch.text for ch in c.stream(prompt))
                else:
                    got[prompt] = c.infer(prompt).text
        except Exception as exc:
            failures.append(exc)

    with Client(thread_gateway.address, "k", timeout_s=TIMEOUT_S) as c:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=4 * TIMEOUT_S)
        assert not any(th.is_alive() for th in threads)
    assert failures == []
    assert got == {p: echo_text(p) for p in got} and len(got) == n_threads * per_thread
    assert len(thread_gateway.peers) == n_threads  # one DEALER per thread


def test_a_closed_client_refuses_calls(thread_gateway: FakeGateway) -> None:
    c = Client(thread_gateway.address, "k", timeout_s=TIMEOUT_S)
    assert c.infer("x").text == echo_text("x")
    c.close()
    c.close()
    with pytest.raises(UnavailableError):
        c.infer("y")
    with pytest.raises(InvalidRequest):
        c.infer("y", timeout_s=float("nan"))


def test_bad_arguments_fail_before_anything_is_sent(thread_gateway: FakeGateway) -> None:
    bad: list[tuple[dict[str, Any], str]] = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 6.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"stop": [""]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"adapter": "a" * 129}, "adapter"),
    ]
    with Client(thread_gateway.address, "k", timeout_s=TIMEOUT_S) as c:
        for kwargs, field in bad:
            with pytest.raises(InvalidRequest) as info:
                c.infer("hi", **kwargs)
            assert info.value.field == field, kwargs
            with pytest.raises(InvalidRequest) as info:
                c.stream("hi", **kwargs)  # refused when made, not when iterated
            assert info.value.field == field, kwargs
        assert c.infer("fine").text == echo_text("fine")
    with Client(thread_gateway.address, "k", tenant="", timeout_s=TIMEOUT_S) as c:
        with pytest.raises(InvalidRequest) as info:
            c.infer("hi")
        assert info.value.field == "tenant"
    assert [r.prompt for r in thread_gateway.requests] == ["fine"]


def test_a_bad_address_is_refused_naming_it() -> None:
    with Client("nonsense://nowhere", "k", timeout_s=TIMEOUT_S) as c:
        with pytest.raises(InvalidRequest) as info:
            c.infer("hi")
        assert info.value.field == "address"


def test_abandoned_generations_are_cancelled_at_the_gateway(thread_gateway: FakeGateway) -> None:
    with Client(thread_gateway.address, "k", timeout_s=TIMEOUT_S) as c:
        stream = c.stream("a b c d e f")
        next(stream)
        stream.close()  # the caller stops early
        left_early = thread_gateway.requests[-1].request_id
        with pytest.raises(TimeoutError):
            c.infer("!silent", timeout_s=0.2)
        timed_out = thread_gateway.requests[-1].request_id
        c.infer("answered")
        list(c.stream("a b"))
        with pytest.raises(AuthError):
            c.infer("!auth")
        deadline = time.monotonic() + TIMEOUT_S
        while len(thread_gateway.cancels) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert [(m.request_id, m.api_key) for m in thread_gateway.cancels] == [
            (left_early, "k"),
            (timed_out, "k"),
        ]
        assert c.cancels_sent == 2


def test_a_dropped_gateway_fails_the_open_call_at_once() -> None:
    with gateway_in_thread() as (gw, stop), Client(gw.address, "k", timeout_s=60) as c:
        assert c.infer("warm up").text == echo_text("warm up")
        stopper = threading.Timer(0.3, stop)  # the gateway dies while the call waits
        stopper.start()
        t0 = time.monotonic()
        with pytest.raises(UnavailableError) as info:
            c.infer("!silent")
        stopper.join()
        assert time.monotonic() - t0 < 10  # not the 60 s deadline
        assert info.value.retriable and c.disconnects == 1
