"""Executors started on demand: the supervisor's side of provisioning (``[provisioning]``).

The scheduler decides *that* another executor is needed: a request found no room and its
provisioner answered ``start`` (:mod:`vajra.actors.scheduler_placement`), so it publishes a
:class:`~vajra.bus.messages.CapacityWanted` on its events socket. This module, run by
``vajra up``'s supervisor when ``provisioning.local_executor_start`` is set, decides which
process to start or stop; the supervisor runs it like every other actor (restarted when it
exits, stopped in order with the rest, gone with the supervisor).

* **Start.** On ``CapacityWanted(n)``: start executors until ``min(n, max_executors)``
  executor processes run (those still starting count, so a repeated message starts nothing
  more). Each is ``exec-K``, K the smallest index at or above the executors ``vajra up``
  started with that no process uses, on the device rotation of those executors.
* **Stop.** An executor started here whose heartbeat showed no queued, running or training
  work at every read for ``idle_stop_s`` is sent SIGTERM: it drains (running requests finish;
  a training job is handed back to the queue), the scheduler stops placing on it, and it
  leaves. One that has not written a heartbeat ``executor_start_s`` after it started is
  stopped as a failed start. The executors ``vajra up`` started with are never stopped here.

The decisions are :class:`ScalePlanner`'s, pure (the caller passes the clock); the I/O is
:class:`ExecutorScaler`'s. Errors: a malformed message is counted and dropped; while Redis
cannot be read, no idle clock advances (nothing is stopped on stale knowledge).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from vajra import bus
from vajra.actors.actor_processes import EXECUTOR_PORT_OFFSET, ActorProcess, executor_process
from vajra.actors.home import StartupError, check_port_free
from vajra.bus.codec import DecodeError, decode, topic
from vajra.bus.messages import CapacityWanted
from vajra.config import VajraConfig
from vajra.errors import VajraError
from vajra.state import ClusterState, OffLoop
from vajra.state.heartbeats import ExecutorHeartbeat

log = logging.getLogger("vajra.supervisor")

WATCH_INTERVAL_S = 1.0  # how often heartbeats are read for idleness


@dataclass(slots=True)
class _Started:
    started_s: float
    idle_since_s: float | None = None
    beaten: bool = False  # it has written a heartbeat


class ScalePlanner:
    """Which on-demand executors to start and stop; see the module docstring.

    ``base``: executors ``vajra up`` started with (indices ``0 .. base-1``, never stopped);
    ``max_executors``: the most executor processes at once; ``start_s``: how long a start
    may take to write its first heartbeat; ``idle_stop_s``: idle time before a stop (0:
    never). ValueError for negative limits.
    """

    def __init__(
        self, *, base: int, max_executors: int, start_s: float, idle_stop_s: float
    ) -> None:
        if base < 0 or max_executors < 0 or start_s < 0 or idle_stop_s < 0:
            raise ValueError("base, max_executors, start_s and idle_stop_s must be >= 0")
        self.base = base
        self.max_executors = max_executors
        self.start_s = start_s
        self.idle_stop_s = idle_stop_s
        self.started: dict[int, _Started] = {}  # on-demand index -> its state
        # Indices being stopped: their process may still drain, so no new one takes the id
        # (two processes of one executor id would share its usage journal) and they count
        # against max_executors until :meth:`stopped`.
        self.stopping: set[int] = set()

    def wanted(self, executors: int, now_s: float) -> list[int]:
        """The indices to start now for ``CapacityWanted(executors)`` (recorded as started)."""
        target = min(executors, self.max_executors - len(self.stopping))
        out: list[int] = []
        index = self.base
        while self.base + len(self.started) < target:
            while index in self.started or index in self.stopping:
                index += 1
            self.started[index] = _Started(now_s)
            out.append(index)
        return out

    def observe(self, heartbeats: Iterable[ExecutorHeartbeat], now_s: float) -> list[int]:
        """Heartbeats read now; the on-demand indices to stop (moved to :attr:`stopping`; the
        caller stops them and then calls :meth:`stopped`)."""
        busy = {
            hb.executor_id: hb.queue_depth + hb.running + hb.training_jobs > 0 for hb in heartbeats
        }
        stop: list[int] = []
        for index, st in self.started.items():
            state = busy.get(f"exec-{index}")
            if state is None:
                st.idle_since_s = None  # no heartbeat: starting, restarting or gone
                if not st.beaten and now_s - st.started_s >= self.start_s:
                    stop.append(index)
                continue
            st.beaten = True
            if state:
                st.idle_since_s = None
            elif st.idle_since_s is None:
                st.idle_since_s = now_s
            elif self.idle_stop_s > 0 and now_s - st.idle_since_s >= self.idle_stop_s:
                stop.append(index)
        for index in stop:
            del self.started[index]
            self.stopping.add(index)
        return stop

    def stopped(self, index: int) -> None:
        """The process of on-demand executor ``index`` has exited: its id is free again."""
        self.stopping.discard(index)


class ExecutorScaler:
    """Receives the scheduler's ``CapacityWanted`` and reads heartbeats; starts executors
    with ``spawn`` and stops them with ``retire`` (both the supervisor's)."""

    def __init__(
        self,
        cfg: VajraConfig,
        config_path: Path,
        *,
        base_devices: Sequence[str | None],
        spawn: Callable[[ActorProcess], None],
        retire: Callable[[str], Awaitable[None]],
    ) -> None:
        p = cfg.provisioning
        self.cfg = cfg
        self.config_path = config_path
        self.devices = list(base_devices) or [None]
        self.planner = ScalePlanner(
            base=len(base_devices),
            max_executors=p.max_executors,
            start_s=p.executor_start_s,
            idle_stop_s=p.idle_stop_s,
        )
        self._spawn = spawn
        self._retire = retire
        self.counters: Counter[str] = Counter()

    async def run(self) -> None:
        """Serve until cancelled (then nothing is left half started or half stopped)."""
        ctx = bus.new_context()
        sub = bus.open_socket(ctx, bus.SUB, high_water_mark=self.cfg.bus.high_water_mark)
        state = ClusterState(self.cfg.cluster.redis_url)
        try:
            sub.subscribe(topic(CapacityWanted.KIND))
            sub.connect(self.cfg.cluster.events_address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive, sub)
                nursery.start_soon(self._watch, state, OffLoop(max_threads=1), nursery)
        finally:
            sub.close()
            ctx.term()
            state.close()

    def start(self, executors: int) -> list[int]:
        """Act on ``CapacityWanted(executors)``: the indices started."""
        started = self.planner.wanted(executors, trio.current_time())
        for index in started:
            device = self.devices[index % len(self.devices)]
            log.info("starting executor exec-%d on demand (%d wanted)", index, executors)
            self.counters["executors_started"] += 1
            self._spawn(
                executor_process(
                    self.cfg, self.config_path, index, device, metrics=self._metrics(index)
                )
            )
        return started

    async def _receive(self, sub: bus.ZSocket) -> None:
        while True:
            for frames in await sub.recv_batch(self.cfg.bus.recv_batch):
                try:
                    msg = decode(frames).message
                except DecodeError:
                    self.counters["malformed"] += 1
                    continue
                if isinstance(msg, CapacityWanted):
                    self.start(msg.executors)

    async def _watch(self, state: ClusterState, redis: OffLoop, nursery: trio.Nursery) -> None:
        while True:
            await trio.sleep(WATCH_INTERVAL_S)
            if not self.planner.started:
                continue
            try:
                with trio.fail_after(self.cfg.bus.rpc_timeout_s):
                    beats = await redis.run(state.heartbeats.list)
            except (VajraError, trio.TooSlowError) as exc:
                log.warning("executor heartbeats not read: %s", exc)
                for st in self.planner.started.values():
                    st.idle_since_s = None
                continue
            for index in self.planner.observe(beats, trio.current_time()):
                log.info("stopping executor exec-%d started on demand (idle or never up)", index)
                self.counters["executors_stopped"] += 1
                nursery.start_soon(self._stop, index)

    async def _stop(self, index: int) -> None:
        try:
            await self._retire(f"executor-{index}")
        finally:
            self.planner.stopped(index)

    def _metrics(self, index: int) -> bool:
        """Whether on-demand executor ``index`` gets its metrics port (only when free)."""
        base = self.cfg.cluster.metrics_port
        if base <= 0:
            return False
        try:
            check_port_free("127.0.0.1", base + EXECUTOR_PORT_OFFSET + index, "metrics")
        except StartupError as exc:
            log.warning("exec-%d starts without metrics: %s", index, exc)
            return False
        return True
