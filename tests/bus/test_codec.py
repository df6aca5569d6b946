"""Codec tests: round trips for every kind, and typed errors for every kind of bad frame."""

from __future__ import annotations

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vajra.bus import codec
from vajra.bus.codec import DecodeError, decode, decode_as, encode
from vajra.bus.messages import (
    ALL_MESSAGES,
    PROTOCOL_VERSION,
    AdapterPush,
    ErrorReply,
    InferRequest,
    InferResult,
    LoadReport,
    Sampling,
    StatsReply,
    Structured,
    TokenChunk,
    TokenLogprob,
)
from vajra.errors import ErrorCode, InvalidRequest
from vajra.policies.decoding import SamplingParams, StructuredOutput


def _header(kind: str = "infer", version: int = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb([version, kind, "m1", None, None])


def test_round_trip_keeps_every_field_and_header() -> None:
    msg = InferRequest(
        request_id="r1",
        api_key="k",
        prompt="héllo",
        adapter="a@2",
        sampling=Sampling(
            stop=("\n",),
            seed=7,
            top_k=5,
            stop_token_ids=(2, 3),
            logprobs=2,
            structured=Structured("regex", "[a-z]+"),
        ),
    )
    env = decode(encode(msg, message_id="m9", reply_to="r0", trace_id="t1"))
    assert env.message == msg
    assert (env.message_id, env.reply_to, env.trace_id) == ("m9", "r0", "t1")


def test_every_kind_is_registered_once() -> None:
    kinds = [cls.KIND for cls in ALL_MESSAGES]
    assert len(kinds) == len(set(kinds))
    assert all(kinds)


def test_a_kinds_topic_prefixes_its_headers_and_no_other_kinds() -> None:
    from vajra.bus.codec import topic
    from vajra.bus.messages import CapacityWanted, RequestEvents

    wanted = topic(CapacityWanted.KIND)
    header = encode(CapacityWanted(executors=3), message_id="m", trace_id="t")[0]
    assert header.startswith(wanted)
    assert not encode(RequestEvents([]))[0].startswith(wanted)
    # No kind's topic is a prefix of another kind's headers (a SUB filter is a prefix match).
    for cls in ALL_MESSAGES:
        assert _header(cls.KIND).startswith(topic(cls.KIND))
        for other in ALL_MESSAGES:
            if other is not cls:
                assert not _header(other.KIND).startswith(topic(cls.KIND)), (cls, other)


def test_optional_fields_take_their_defaults_and_ints_widen_to_float() -> None:
    body = msgpack.packb(
        {"request_id": "r", "api_key": "k", "prompt": "p", "sampling": {"temperature": 1}}
    )
    msg = decode([_header(), body]).message
    assert isinstance(msg, InferRequest)
    s = msg.sampling
    assert s.max_tokens == 64 and s.stop == () and s.temperature == 1.0
    assert isinstance(s.temperature, float)
    assert s.params() == SamplingParams(temperature=1.0)


def test_the_wire_sampling_mirrors_sampling_params_field_for_field() -> None:
    """One definition: the wire struct has SamplingParams' fields, in order, with its defaults."""
    import dataclasses

    wire = [(f.name, f.default) for f in msgspec.structs.fields(Sampling)]
    params = [(f.name, f.default) for f in dataclasses.fields(SamplingParams)]
    assert wire == params
    full = SamplingParams(
        max_tokens=9,
        temperature=0.5,
        top_p=0.9,
        top_k=4,
        stop=("x",),
        seed=3,
        stop_token_ids=(1, 2),
        min_tokens=2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        ignore_eos=True,
        logprobs=3,
        prompt_logprobs=0,
        structured=StructuredOutput("json_schema", '{"type":"object"}'),
    )
    assert decode_as(encode(_infer(Sampling.of(full))), InferRequest)[0].sampling.params() == full
    # Defaults are not sent at all.
    assert msgspec.msgpack.encode(Sampling()) == b"\x80"


def _infer(sampling: Sampling) -> InferRequest:
    return InferRequest(request_id="r", api_key="k", prompt="p", sampling=sampling)


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (Sampling(max_tokens=0), "max_tokens"),
        (Sampling(temperature=float("nan")), "temperature"),
        (Sampling(top_k=-1), "top_k"),
        (Sampling(stop_token_ids=(-1,)), "stop_token_ids"),
        (Sampling(min_tokens=65), "min_tokens"),
        (Sampling(presence_penalty=3.0), "presence_penalty"),
        (Sampling(repetition_penalty=0.0), "repetition_penalty"),
        (Sampling(logprobs=21), "logprobs"),
        (Sampling(prompt_logprobs=-1), "prompt_logprobs"),
        (Sampling(structured=Structured("yaml", "x")), "response_format"),
        (Sampling(structured=Structured("json_schema", "{")), "response_format"),
    ],
)
def test_bad_decoding_values_decode_and_are_refused_naming_the_field(
    sampling: Sampling, field: str
) -> None:
    """Values of the right type travel; building the engine's parameters refuses them."""
    msg = decode(encode(_infer(sampling))).message
    assert isinstance(msg, InferRequest)
    with pytest.raises(InvalidRequest) as info:
        msg.sampling.params()
    assert info.value.field == field


def test_logprobs_travel_in_chunks_and_results() -> None:
    lp = [
        TokenLogprob(5, "a", -0.5, ((5, "a", -0.5), (6, "b", -1.5))),
        TokenLogprob(1, "<s>", None),
    ]
    chunk = TokenChunk("r", 0, "a", [5], lp[:1], lp[::-1])
    assert decode(encode(chunk)).message == chunk
    result = InferResult("r", "a", [5], "stop", 2, 1, 0.0, logprobs=lp[:1], prompt_logprobs=None)
    assert decode(encode(result)).message == result


def test_unknown_extra_fields_are_ignored_for_forward_compatibility() -> None:
    body = msgpack.packb({"request_id": "r", "api_key": "k", "prompt": "p", "future": 1})
    assert isinstance(decode([_header(), body]).message, InferRequest)


@pytest.mark.parametrize(
    ("frames", "code", "field"),
    [
        ([b"\xc1", b"\x80"], ErrorCode.MALFORMED_FRAME, None),
        ([_header()], ErrorCode.MALFORMED_FRAME, None),
        ([_header(), b"\x80", b"x"], ErrorCode.MALFORMED_FRAME, None),
        ([msgpack.packb([1, 2]), b"\x80"], ErrorCode.MALFORMED_FRAME, None),
        ([_header(version=99), b"\x80"], ErrorCode.UNSUPPORTED_VERSION, "version"),
        ([_header(kind="nope"), b"\x80"], ErrorCode.UNKNOWN_KIND, "kind"),
        ([_header(), msgpack.packb([1, 2, 3])], ErrorCode.MALFORMED_FRAME, None),
        ([_header(), b"\xff\xff"], ErrorCode.MALFORMED_FRAME, None),
        (
            [_header(), msgpack.packb({"request_id": "r", "api_key": "k"})],
            ErrorCode.MALFORMED_FRAME,
            "prompt",
        ),
        (
            [_header(), msgpack.packb({"request_id": "r", "api_key": "k", "prompt": 5})],
            ErrorCode.MALFORMED_FRAME,
            "prompt",
        ),
        (
            [
                _header(),
                msgpack.packb(
                    {
                        "request_id": "r",
                        "api_key": "k",
                        "prompt": "p",
                        "sampling": {"max_tokens": True},
                    }
                ),
            ],
            ErrorCode.MALFORMED_FRAME,
            "max_tokens",
        ),
        (
            [
                _header(),
                msgpack.packb(
                    {
                        "request_id": "r",
                        "api_key": "k",
                        "prompt": "p",
                        "sampling": {"stop": ["a", 1]},
                    }
                ),
            ],
            ErrorCode.MALFORMED_FRAME,
            "stop",
        ),
    ],
)
def test_bad_frames_raise_typed_errors_naming_the_problem(
    frames: list[bytes], code: ErrorCode, field: str | None
) -> None:
    with pytest.raises(DecodeError) as info:
        decode(frames)
    assert info.value.code == code
    assert info.value.field == field


def test_decode_error_recovers_the_request_id_for_the_reply() -> None:
    body = msgpack.packb({"request_id": "r42", "api_key": "k", "prompt": 3})
    with pytest.raises(DecodeError) as info:
        decode([_header(), body])
    assert info.value.request_id == "r42"
    assert info.value.message_id == "m1"


def test_oversized_body_is_refused_before_unpacking() -> None:
    body = msgpack.packb({"request_id": "r", "api_key": "k", "prompt": "x" * 2000})
    with pytest.raises(DecodeError) as info:
        decode([_header(), body], max_body_bytes=1000)
    assert info.value.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_decode_as_refuses_another_kind() -> None:
    frames = encode(ErrorReply(request_id="r", code="internal", message="m"))
    with pytest.raises(DecodeError):
        decode_as(frames, InferResult)
    msg, _ = decode_as(frames, ErrorReply)
    assert msg.code == "internal"


def test_nested_types_validate() -> None:
    good = StatsReply(request_id="r", actor="gw", counters={"a": 1})
    assert decode(encode(good)).message == good
    bad = encode(LoadReport(executor_id="e", incarnation="i", queue_depth=0, running=0))
    body = msgpack.unpackb(bad[1])
    body["finished_ids"] = [1]
    with pytest.raises(DecodeError):
        decode([bad[0], msgpack.packb(body)])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_random_frames_never_raise_anything_but_decode_error(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except DecodeError:
        pass


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([cls.KIND for cls in ALL_MESSAGES]),
    st.dictionaries(
        st.sampled_from(sorted({f.name for c in ALL_MESSAGES for f in msgspec.structs.fields(c)})),
        _json,
        max_size=8,
    ),
)
def test_random_bodies_for_every_kind_decode_or_fail_typed(
    kind: str, body: dict[str, object]
) -> None:
    try:
        env = decode([_header(kind=kind), msgpack.packb(body)])
    except DecodeError:
        return
    assert kind == env.message.KIND
    # Whatever decoded must encode again and decode to the same message.
    assert decode(encode(env.message)).message == env.message


def test_decoders_cover_all_messages() -> None:
    assert set(codec._DECODERS) == {cls.KIND for cls in ALL_MESSAGES}


def test_decode_many_takes_apart_a_batch_and_isolates_a_bad_body() -> None:
    push = AdapterPush(request_id="p1", api_key="k", name="lora")
    messages = [
        encode(StatsReply(request_id="s1", actor="a", counters={"x": 1})),
        [_header(), msgpack.packb({"request_id": "bad", "api_key": 3})],  # wrong type
        encode(push, bulk=[b"{}", b"weights"]),
        encode(ErrorReply(request_id="e1", code="internal", message="m")),
    ]
    out = codec.decode_many([codec.pack_batch(messages)])
    assert len(out) == 4
    first, bad, pushed, last = (env for env, _ in out)
    assert isinstance(first, codec.Envelope) and first.message.request_id == "s1"  # type: ignore[attr-defined]
    assert isinstance(bad, DecodeError) and bad.field == "api_key" and bad.request_id == "bad"
    assert isinstance(pushed, codec.Envelope) and pushed.bulk == (b"{}", b"weights")
    assert isinstance(last, codec.Envelope) and isinstance(last.message, ErrorReply)
    # Each item carries its own frames, so a message can be forwarded byte for byte.
    assert [list(own) for _, own in out] == messages
    # A message alone travels as its own frames.
    (alone,) = codec.decode_many(messages[3])
    assert isinstance(alone[0], codec.Envelope) and alone[0].message == last.message


@pytest.mark.parametrize(
    "frames",
    [[b"\xc1not msgpack"], [msgpack.packb([1, 2])], [msgpack.packb([[b"a"], "x"])], [b""]],
)
def test_decode_many_answers_a_bad_batch_frame_with_one_error(frames: list[bytes]) -> None:
    ((env, own),) = codec.decode_many(frames)
    assert isinstance(env, DecodeError) and "batch" in str(env)
    assert list(own) == frames


def test_decode_many_reports_each_bad_message_of_a_batch() -> None:
    good = encode(ErrorReply(request_id="e1", code="internal", message="m"))
    out = codec.decode_many([codec.pack_batch([good, [b"\xc1", b"body"], [good[0]], good])])
    kinds = [type(env) for env, _ in out]
    assert kinds == [codec.Envelope, DecodeError, DecodeError, codec.Envelope]
    ((empty, _),) = codec.decode_many([])
    assert isinstance(empty, DecodeError) and "expected 2 frames" in str(empty)
