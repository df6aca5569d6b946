"""Provisioning (the paper's ``ProvisionNewGPU``): what to do when no executor can take a request.

Placement answers None when no executor of the request's base model has room
(:meth:`vajra.policies.placement.PlacementIndex.choose`). The caller then asks a
:class:`Provisioner`, which answers one of:

* ``start``: start another executor for that base model (locally: another executor process, when
  the config allows it; in the simulator: a new GPU after its start-up time); the request waits
  for it, at most until ``until_ms``;
* ``wait``: hold the request until ``until_ms`` and try placement again meanwhile (capacity may
  free up, or an executor started earlier may join);
* ``refuse``: answer the request with a typed ``no_capacity`` error now.

A request never waits longer than ``max_wait_ms`` from when it first found no room: past that
the answer is ``refuse``. Pure code: no clock (the caller passes ``now_ms``), no I/O. Invalid
arguments (negative times or limits) raise ``ValueError`` at construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class ProvisionAction(StrEnum):
    START = "start"
    WAIT = "wait"
    REFUSE = "refuse"


@dataclass(frozen=True, slots=True)
class ProvisionDecision:
    action: ProvisionAction
    until_ms: float | None = None  # for start and wait: when the request gives up waiting
    reason: str = ""


class Provisioner(Protocol):
    def provision(
        self, base_model: str, now_ms: float, *, waiting_since_ms: float | None = None
    ) -> ProvisionDecision: ...


class CapacityProvisioner:
    """Starts executors while the budget allows, else bounds the wait.

    ``allow_start``: whether new executors may be started at all (locally:
    ``provisioning.allow_local_executor_start``); ``max_executors``: the most executors per base
    model, counting those starting; ``start_ms``: how long one takes to join (a start is
    "pending" until :meth:`started` or until ``start_ms`` passed); ``max_wait_ms``: the longest a
    request waits for room.
    """

    def __init__(
        self,
        *,
        allow_start: bool,
        max_executors: int,
        max_wait_ms: float,
        start_ms: float = 30_000.0,
    ) -> None:
        if max_executors < 0 or max_wait_ms < 0 or start_ms < 0:
            raise ValueError("max_executors, max_wait_ms and start_ms must be >= 0")
        self.allow_start = allow_start
        self.max_executors = max_executors
        self.max_wait_ms = float(max_wait_ms)
        self.start_ms = float(start_ms)
        self.running: dict[str, int] = {}  # base model -> executors serving it
        self.pending: dict[str, list[float]] = {}  # base model -> start times of pending starts
        self.starts = 0
        self.refusals = 0

    def set_running(self, base_model: str, count: int) -> None:
        """How many executors of ``base_model`` serve now (the caller keeps this current)."""
        self.running[base_model] = max(0, count)

    def started(self, base_model: str) -> None:
        """One pending start of ``base_model`` joined (the oldest one)."""
        starts = self.pending.get(base_model)
        if starts:
            starts.pop(0)

    def provision(
        self, base_model: str, now_ms: float, *, waiting_since_ms: float | None = None
    ) -> ProvisionDecision:
        since = now_ms if waiting_since_ms is None else min(waiting_since_ms, now_ms)
        deadline = since + self.max_wait_ms
        if now_ms >= deadline:
            self.refusals += 1
            return ProvisionDecision(
                ProvisionAction.REFUSE, None, f"no executor of {base_model} had room"
            )
        starts = [t for t in self.pending.get(base_model, []) if now_ms - t < self.start_ms]
        self.pending[base_model] = starts
        total = self.running.get(base_model, 0) + len(starts)
        if starts:
            # One start at a time per base model: the request waits for the one under way.
            return ProvisionDecision(ProvisionAction.WAIT, deadline, "an executor is starting")
        if self.allow_start and total < self.max_executors:
            starts.append(now_ms)
            self.starts += 1
            return ProvisionDecision(
                ProvisionAction.START, deadline, f"starting an executor of {base_model}"
            )
        return ProvisionDecision(ProvisionAction.WAIT, deadline, "waiting for room")
