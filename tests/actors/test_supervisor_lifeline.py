"""What keeps `vajra up`'s process tree tidy, piece by piece, in-process.

- the lifeline pipe: an actor whose supervisor exits drains (bounded) and returns;
- the home lock: one cluster per VAJRA_HOME, a live one refused at once, a dead one's
  leftovers waited for (bounded);
- the port probe: a port in use fails the start with one line.

Test rules: real pipes, files and loopback sockets; every async test under `trio.fail_after`;
helper processes are started here and ended here by their pid.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from vajra.actors import base
from vajra.actors.base import inherited_parent_fd, serve_until_signalled
from vajra.actors.home import HomeLock, StartupError, check_port_free


class FakeActor:
    """Starts after ``start_s``; ``drain`` takes ``drain_s``; records what happened."""

    name = "fake"

    def __init__(self, *, start_s: float = 0.0, drain_s: float = 0.0) -> None:
        self.start_s = start_s
        self.drain_s = drain_s
        self.events: list[str] = []
        self.started = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await trio.sleep(self.start_s)
            task_status.started()
            self.events.append("started")
            self.started.set()
            await trio.sleep_forever()
        finally:
            self.events.append("run ended")

    async def drain(self) -> None:
        self.events.append("drain")
        await trio.sleep(self.drain_s)
        self.events.append("drained")


@pytest.fixture
def lifeline() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


async def test_actor_drains_and_returns_when_its_supervisor_exits(
    lifeline: tuple[int, int],
) -> None:
    r, w = lifeline
    actor = FakeActor()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_until_signalled, actor, parent_fd=r))  # type: ignore[arg-type]
            await actor.started.wait()
            assert "drain" not in actor.events
            os.close(w)  # the supervisor exits: the last write end closes
    assert actor.events == ["started", "drain", "drained", "run ended"]


async def test_orphaned_actor_drain_is_cut_off(
    lifeline: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "ORPHAN_DRAIN_LIMIT_S", 0.3)
    r, w = lifeline
    actor = FakeActor(drain_s=3600)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_until_signalled, actor, parent_fd=r))  # type: ignore[arg-type]
            await actor.started.wait()
            t0 = trio.current_time()
            os.close(w)
        assert trio.current_time() - t0 < 5
    assert actor.events == ["started", "drain", "run ended"]


async def test_supervisor_exit_during_startup_cancels_the_start(
    lifeline: tuple[int, int],
) -> None:
    r, w = lifeline
    actor = FakeActor(start_s=3600)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(serve_until_signalled, actor, parent_fd=r))  # type: ignore[arg-type]
            await trio.sleep(0.1)
            os.close(w)
    assert actor.events == ["run ended"]


async def test_on_ready_runs_once_the_actor_started_and_not_for_a_cancelled_start(
    lifeline: tuple[int, int],
) -> None:
    r, w = lifeline
    actor = FakeActor()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ready = partial(actor.events.append, "on_ready")
            nursery.start_soon(partial(serve_until_signalled, actor, parent_fd=r, on_ready=ready))  # type: ignore[arg-type]
            await actor.started.wait()
            await trio.sleep(0.05)
            os.close(w)
    assert actor.events == ["started", "on_ready", "drain", "drained", "run ended"]
    r2, w2 = os.pipe()
    slow = FakeActor(start_s=3600)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ready = partial(slow.events.append, "on_ready")
            nursery.start_soon(partial(serve_until_signalled, slow, parent_fd=r2, on_ready=ready))  # type: ignore[arg-type]
            await trio.sleep(0.1)
            os.close(w2)
    os.close(r2)
    assert slow.events == ["run ended"]


def test_freezing_the_startup_heap_leaves_the_collector_only_new_objects() -> None:
    """In a process of its own (a freeze is for the rest of a process's life): what exists
    when the actor is ready is out of the collector's reach; what serving allocates is not."""
    script = (
        "import gc\n"
        "from vajra.actors.base import freeze_startup_heap\n"
        "startup = [[i] for i in range(50_000)]\n"
        "freeze_startup_heap()\n"
        "assert gc.get_freeze_count() >= 50_000, gc.get_freeze_count()\n"
        "cycle = []; cycle.append(cycle); del cycle\n"
        "assert gc.collect() >= 1  # serving's garbage cycles are still collected\n"
        "print('frozen', gc.get_freeze_count())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("frozen ")


def test_inherited_parent_fd(lifeline: tuple[int, int], tmp_path: Path) -> None:
    r, _ = lifeline
    assert inherited_parent_fd({}) is None
    assert inherited_parent_fd({base.PARENT_FD_ENV: "nope"}) is None
    assert inherited_parent_fd({base.PARENT_FD_ENV: "987654"}) is None  # not open
    with (tmp_path / "f").open("w") as f:  # open, but not a pipe
        assert inherited_parent_fd({base.PARENT_FD_ENV: str(f.fileno())}) is None
    os.set_inheritable(r, True)
    with (tmp_path / "lock").open("w") as lock:
        os.set_inheritable(lock.fileno(), True)
        env = {base.PARENT_FD_ENV: str(r), base.HOME_LOCK_FD_ENV: str(lock.fileno())}
        assert inherited_parent_fd(env) == r
        # The actor's own children keep neither open.
        assert not os.get_inheritable(r) and not os.get_inheritable(lock.fileno())


# --- the home lock ---------------------------------------------------------------------------

_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
if sys.argv[2] == "supervisor":
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\\n".encode(), 0)
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
"""


def _hold(lock: Path, role: str, seconds: float) -> subprocess.Popen[str]:
    """A process holding ``lock``; as "supervisor" its command line reads like `vajra up`."""
    argv = [sys.executable, "-c", _HOLDER, str(lock), role, str(seconds)]
    if role == "supervisor":
        argv += ["vajra", "up"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


async def test_lock_held_by_a_live_supervisor_fails_at_once(tmp_path: Path) -> None:
    path = tmp_path / "home" / "run" / "lock"
    path.parent.mkdir(parents=True)
    holder = _hold(path, "supervisor", 60)
    try:
        with trio.fail_after(10):
            t0 = time.monotonic()
            with pytest.raises(StartupError) as info:
                await HomeLock(path).acquire(wait_s=30)
            assert time.monotonic() - t0 < 2
        message = str(info.value)
        assert "already running" in message and str(holder.pid) in message
        assert "\n" not in message
    finally:
        _end(holder)


async def test_lock_held_by_leftovers_is_waited_for_then_taken(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    (tmp_path / "lock").write_text("999999\n")  # a supervisor that no longer runs
    leftover = _hold(path, "actor", 1.0)  # an actor still draining for a second
    lock = HomeLock(path)
    try:
        with trio.fail_after(20):
            await lock.acquire(wait_s=15)
        assert leftover.poll() is not None
        assert path.read_text().strip() == str(os.getpid())
        assert lock.fd is not None and not os.get_inheritable(lock.fd)
    finally:
        lock.release()
        _end(leftover)


async def test_lock_held_by_leftovers_too_long_fails(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    leftover = _hold(path, "actor", 60)
    try:
        with trio.fail_after(10):
            with pytest.raises(StartupError, match="still hold"):
                await HomeLock(path).acquire(wait_s=0.5)
    finally:
        _end(leftover)


# --- ports -----------------------------------------------------------------------------------


def test_port_in_use_fails_with_one_line() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(StartupError) as info:
            check_port_free("127.0.0.1", port, "gateway")
    message = str(info.value)
    assert f"gateway port 127.0.0.1:{port} is in use" in message and "\n" not in message
    check_port_free("127.0.0.1", port, "gateway")  # closed: free again
