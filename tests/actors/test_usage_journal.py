"""The executor's usage journal: nothing recorded is lost by a crash, nothing acknowledged
comes back, a torn last line is skipped.

Rules: files under tmp_path only; the crash test kills a real child process with SIGKILL;
every wait bounded (``trio.fail_after`` in the async test).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import trio

from vajra import bus
from vajra.actors.base import wait_until
from vajra.actors.executor_usage import UsageOutbox
from vajra.actors.usage_journal import Progress, UsageJournal, read_segments, segments
from vajra.bus.messages import InferWork, Sampling, UsageEvent
from vajra.bus.zsocket import open_socket
from vajra.config import VajraConfig
from vajra.gpu.interface import StepOutput


def _event(i: int, **changes: object) -> UsageEvent:
    fields: dict[str, object] = {
        "event_id": f"exec-0.inc.{i}",
        "tenant_id": "t_1",
        "request_id": f"r{i}",
        "executor_id": "exec-0",
        "gpu_ms": 1.5 + i,
        "prompt_tokens": 3,
        "completion_tokens": i,
        "ts_unix_ms": 1_700_000_000_000 + i,
        "adapter": "chat",
        "adapter_version": 2,
    }
    fields.update(changes)
    return UsageEvent(**fields)  # type: ignore[arg-type]


def _journal(tmp_path: Path, incarnation: str, *, keep: bool = False) -> UsageJournal:
    j = UsageJournal(tmp_path / "exec-0", incarnation, keep=keep)
    j.open()
    return j


def test_unacknowledged_events_pass_to_the_next_incarnation(tmp_path: Path) -> None:
    first = _journal(tmp_path, "a")
    first.append([_event(i) for i in range(5)])
    first.ack([_event(1).event_id, _event(3).event_id])
    # No close: the process died. The next incarnation takes over.
    second = _journal(tmp_path, "b")
    recovered = second.recover()
    assert [e.event_id for e in recovered] == [_event(i).event_id for i in (0, 2, 4)]
    assert recovered[0] == _event(0)  # every field survives the round trip
    assert [p.name for p in segments(tmp_path / "exec-0")] == ["usage-b-000001.jsonl"]
    # ... and the one after that still sees them, until they are acknowledged.
    second.ack([_event(0).event_id])
    third = _journal(tmp_path, "c")
    assert [e.event_id for e in third.recover()] == [_event(i).event_id for i in (2, 4)]
    assert third.recover() == []  # nothing left in other segments


def test_a_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    first = _journal(tmp_path, "a")
    first.append([_event(0), _event(1)])
    assert first.path is not None
    with first.path.open("ab") as f:
        f.write(b'{"e":{"event_id":"exec-0.inc.2","tenant_')  # the crash cut it here
    second = _journal(tmp_path, "b")
    assert [e.event_id for e in second.recover()] == [_event(0).event_id, _event(1).event_id]
    assert second.bad_lines == 1


@pytest.mark.parametrize(
    "garbage",
    [
        b"not json\n",
        b"{}\n",
        b'{"e": {"event_id": 5}}\n',
        b'{"a": "x"}\n',
        b'{"p": [["x", 1.0]], "t": 1}\n',
        b"\xff\xfe\n",
    ],
)
def test_unreadable_lines_are_skipped_not_fatal(tmp_path: Path, garbage: bytes) -> None:
    first = _journal(tmp_path, "a")
    first.append([_event(0)])
    assert first.path is not None
    with first.path.open("ab") as f:
        f.write(garbage)
    first.append([_event(1)])
    contents = read_segments(segments(tmp_path / "exec-0"))
    assert sorted(contents.events) == [_event(0).event_id, _event(1).event_id]
    assert contents.bad_lines == (0 if garbage == b"{}\n" else 1)


def test_a_crash_during_recovery_counts_each_event_once(tmp_path: Path) -> None:
    first = _journal(tmp_path, "a")
    first.append([_event(i) for i in range(3)])
    # Incarnation b copied the events, then died before retiring a's segment.
    second = _journal(tmp_path, "b")
    second.append([_event(i) for i in range(3)])
    second.ack([_event(2).event_id])
    third = _journal(tmp_path, "c")
    assert [e.event_id for e in third.recover()] == [_event(0).event_id, _event(1).event_id]


def test_rotation_keeps_only_the_pending_events(tmp_path: Path) -> None:
    j = _journal(tmp_path, "a")
    j.append([_event(i) for i in range(10)])
    j.ack([_event(i).event_id for i in range(8)])
    j.rotate([_event(8), _event(9)], [])
    assert j.lines == 2
    assert [p.name for p in segments(tmp_path / "exec-0")] == ["usage-a-000002.jsonl"]
    j.append([_event(10)])
    nxt = _journal(tmp_path, "b")
    assert [e.event_id for e in nxt.recover()] == [_event(i).event_id for i in (8, 9, 10)]


def _counts(i: int, completion: int, gpu_ms: float = 1.0) -> Progress:
    return (_event(i).event_id, gpu_ms, 3, completion)


def test_a_stream_cut_short_by_a_crash_is_billed_its_largest_progress(tmp_path: Path) -> None:
    first = _journal(tmp_path, "a")
    # Passes of the loop: streams 0 and 1 start, then only their counts; request 2 ends.
    first.progress([_event(0, completion_tokens=1), _event(1, completion_tokens=1)], [], 10)
    first.progress([], [_counts(0, 2), _counts(1, 2)], 20)
    first.append([_event(2)])
    first.progress([_event(2, completion_tokens=1)], [_counts(0, 5, 9.0)], 30)
    first.append([_event(1, completion_tokens=3)])  # stream 1 ended: its event wins
    first.progress([_event(3, completion_tokens=0, gpu_ms=0.0)], [], 40)  # nothing computed
    # kill -9 here: stream 0 never ended.
    second = _journal(tmp_path, "b")
    recovered = {e.event_id: e for e in second.recover()}
    assert sorted(recovered) == sorted(_event(i).event_id for i in (0, 1, 2))
    assert recovered[_event(0).event_id] == _event(
        0, completion_tokens=5, gpu_ms=9.0, ts_unix_ms=30
    )
    assert recovered[_event(1).event_id].completion_tokens == 3
    assert recovered[_event(2).event_id] == _event(2)  # an event beats a stale progress
    # Recovery wrote them as events: once acknowledged, they are gone for good.
    second.ack([_event(i).event_id for i in (0, 1)])
    assert [e.event_id for e in _journal(tmp_path, "c").recover()] == [_event(2).event_id]


def test_progress_read_in_any_order_keeps_the_largest(tmp_path: Path) -> None:
    first = _journal(tmp_path, "a")
    first.progress([_event(0, completion_tokens=1)], [_counts(0, 7)], 50)
    # A segment that sorts after it, holding an older record (incarnations sort by name).
    other = _journal(tmp_path, "b")
    other.progress([_event(0, completion_tokens=4)], [], 40)
    contents = read_segments(segments(tmp_path / "exec-0"))
    assert [(e.completion_tokens, e.ts_unix_ms) for e in contents.unacked()] == [(7, 50)]


def test_a_progress_line_without_its_first_record_bills_nothing(tmp_path: Path) -> None:
    first = _journal(tmp_path, "a")
    first.progress([], [_counts(0, 7)], 50)  # its first record was lost: no tenant to bill
    assert _journal(tmp_path, "b").recover() == []


def test_rotation_carries_the_running_streams_progress(tmp_path: Path) -> None:
    j = _journal(tmp_path, "a")
    j.progress([_event(0, completion_tokens=2)], [], 10)
    j.append([_event(1)])
    j.ack([_event(1).event_id])
    j.rotate([], [_event(0, completion_tokens=3)])
    assert j.lines == 1 and j.bytes > 0
    recovered = _journal(tmp_path, "b").recover()
    assert recovered == [_event(0, completion_tokens=3)]


def test_kept_segments_hold_every_event_ever_recorded(tmp_path: Path) -> None:
    j = _journal(tmp_path, "a", keep=True)
    j.append([_event(i) for i in range(4)])
    j.ack([_event(i).event_id for i in range(4)])
    j.rotate([], [])
    j.append([_event(4)])
    j.close()
    nxt = _journal(tmp_path, "b", keep=True)
    assert [e.event_id for e in nxt.recover()] == [_event(4).event_id]
    every = read_segments(segments(tmp_path / "exec-0", include_done=True))
    assert sorted(every.events) == sorted(_event(i).event_id for i in range(5))
    assert len(segments(tmp_path / "exec-0")) == 1  # only b's is live


def test_an_empty_or_missing_directory_recovers_nothing(tmp_path: Path) -> None:
    assert read_segments(segments(tmp_path / "nowhere")).events == {}
    j = _journal(tmp_path, "a")
    assert j.recover() == []
    j.append([])
    j.ack([])
    assert j.lines == 0


_CHILD = """
import sys, time
from pathlib import Path
from vajra.actors.usage_journal import UsageJournal
from vajra.bus.messages import UsageEvent
j = UsageJournal(Path(sys.argv[1]), "child")
j.open()
for i in range(2000):
    j.append([UsageEvent(f"ev{i}", "t_1", f"r{i}", "exec-0", 1.0, 1, 1, i)])
    if i % 500 == 499:
        j.ack([f"ev{i}"])
print("written", flush=True)
time.sleep(60)
"""


def test_kill_9_loses_nothing_written(tmp_path: Path) -> None:
    directory = tmp_path / "exec-0"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(directory)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "written"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    recovered = _journal(tmp_path, "after").recover()
    assert len(recovered) == 2000 - 4
    assert {e.event_id for e in recovered} == {f"ev{i}" for i in range(2000)} - {
        f"ev{i}" for i in (499, 999, 1499, 1999)
    }


# --- the outbox over the journal ------------------------------------------------------------


async def test_the_outbox_never_drops_and_hands_over_to_the_next_incarnation(
    tmp_path: Path,
) -> None:
    cfg = (
        VajraConfig()
        .replace(
            "cluster", home=str(tmp_path / "home"), ledger_address="ipc://" + str(tmp_path / "l")
        )
        .replace("executor", max_usage_outbox=3, usage_resend_s=0.05)
    )
    ctx = bus.new_context()
    counters: Counter[str] = Counter()
    try:
        with trio.fail_after(20):
            sock = open_socket(ctx, bus.DEALER, identity=b"exec-0")  # no ledger at the other end
            first = UsageOutbox(cfg, sock, counters, executor_id="exec-0", incarnation="one")
            for i in range(5):
                work = InferWork(
                    f"r{i}", "t_1", "hi", f"chat@{i}", Sampling(), False, 0, "gw", adapter_version=i
                )
                first.record(work, StepOutput(f"r{i}", "", (), True, "abort", 2, i, 1.5 * i))
            # Past max_usage_outbox every event is still kept; new work is refused instead.
            assert len(first.pending) == 5 and first.backlogged()
            assert counters["usage_outbox_backlogged"] == 2
            first.record_training(
                tenant_id="t_1",
                adapter="chat",
                version=3,
                job_id="j1",
                step=7,
                gpu_ms=40.0,
                gradients=1000,
                tokens=64,
            )
            first.record_training(  # the same step computed again (a resumed job): billed once
                tenant_id="t_1",
                adapter="chat",
                version=3,
                job_id="j1",
                step=7,
                gpu_ms=41.0,
                gradients=1000,
                tokens=64,
            )
            assert counters["usage_rerecorded"] == 1 and len(first.pending) == 6
            event = first.pending["exec-0.one.r3"][0]
            assert (event.adapter, event.adapter_version, event.kind) == ("chat", 3, "inference")
            assert first.pending["train.j1.7"][0].gradients == 1000
            await first.sync()
            # The process dies here (no drain). The next incarnation takes every event over.
            second = UsageOutbox(cfg, sock, counters, executor_id="exec-0", incarnation="two")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(second.resend)
                await wait_until(lambda: counters["usage_recovered"] >= 6, poll_s=0.01)
                nursery.cancel_scope.cancel()
            assert sorted(second.pending) == sorted(first.pending)
            assert second.pending["train.j1.7"][0].gpu_ms == 40.0  # the first record wins
            sock.close()
    finally:
        ctx.term()


def test_a_closed_journal_refuses_events_but_ignores_late_acks(tmp_path: Path) -> None:
    j = _journal(tmp_path, "a")
    j.append([_event(0)])
    j.close()
    j.ack([_event(0).event_id])  # an ack arriving after close: the event is resent later
    with pytest.raises(OSError):
        j.append([_event(1)])
    assert [e.event_id for e in _journal(tmp_path, "b").recover()] == [_event(0).event_id]


async def test_the_outbox_journals_stream_progress_until_the_request_is_recorded(
    tmp_path: Path,
) -> None:
    cfg = VajraConfig().replace("cluster", home=str(tmp_path / "home"))
    ctx = bus.new_context()
    sock = open_socket(ctx, bus.DEALER, identity=b"exec-0")
    try:
        first = UsageOutbox(cfg, sock, Counter(), executor_id="exec-0", incarnation="one")
        works = [InferWork(f"r{i}", "t_1", "hi", "chat", Sampling(), True, 0, "gw") for i in (0, 1)]
        for step in (1, 2, 3):  # three passes of both streams
            first.progress(
                [
                    (w, StepOutput(w.request_id, "x", (7,), False, None, 4, step, 2.0 * step))
                    for w in works
                ]
            )
        first.record(works[1], StepOutput("r1", "", (), True, "length", 4, 3, 6.5))
        first.forget("r9")  # a request with no progress: nothing to drop
        assert list(first._running) == ["exec-0.one.r0"]
        # kill -9 here: r0 was streaming, r1 had ended.
        recovered = UsageJournal(first.journal.directory, "two")
        recovered.open()
        events = {e.request_id: e for e in recovered.recover()}
        assert sorted(events) == ["r0", "r1"]
        assert (events["r0"].completion_tokens, events["r0"].gpu_ms) == (3, 6.0)
        assert (events["r1"].completion_tokens, events["r1"].gpu_ms) == (3, 6.5)
        assert events["r0"].event_id == "exec-0.one.r0"  # the id it would have ended with
    finally:
        sock.close()
        ctx.term()
