"""What every part of an executor's job runner reads and writes through: the config, the
cluster state (Redis, called off the event loop) and the object store.

:class:`JobIO` is built once by the runner (:mod:`vajra.actors.executor_jobs`) and handed to
its parts (:class:`~vajra.actors.executor_job_steps.StepBook`,
:class:`~vajra.actors.executor_job_ends.JobEnds`,
:class:`~vajra.actors.executor_job_publish.Publisher`), which take it apart in
:class:`UsesJobIO`. Plain data: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass

from vajra.config import VajraConfig
from vajra.state import ClusterState, OffLoop
from vajra.storage import ObjectStore


@dataclass(frozen=True, slots=True)
class JobIO:
    cfg: VajraConfig
    state: ClusterState
    store: ObjectStore
    redis: OffLoop


class UsesJobIO:
    """A part of the job runner: ``self.cfg``, ``self.state``, ``self.store`` and
    ``self.redis`` from one :class:`JobIO`."""

    def __init__(self, io: JobIO) -> None:
        self.cfg = io.cfg
        self.state = io.state
        self.store = io.store
        self.redis = io.redis
