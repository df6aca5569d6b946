"""CUDA stream priorities: inference steps before training micro-steps.

CUDA runs ready work of a higher-priority stream first (lower numbers are higher priorities;
0, the default stream's, is the lowest). The engine runs each step on a stream of
:data:`INFERENCE_PRIORITY` and the trainer (:mod:`vajra.gpu.training`) its micro-steps on one
of :data:`TRAINING_PRIORITY`, so a decode step queued behind a training micro-step overtakes
its kernels instead of waiting for them.

:func:`fork_join` keeps the caller's stream order: the step's stream first waits for what the
caller's current stream has queued (adapter copies, frees), and the caller's stream then
waits for the step. Everything outside a step (loading and freeing adapter slots) can stay on
the caller's stream. The training stream is joined only through the host: each optimizer step
ends by reading its loss.

On the CPU there are no streams: :func:`priority_stream` returns None and :func:`fork_join`
does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: The engine's steps: a higher priority than the default stream's (torch maps a number
#: beyond the device's range to its highest priority).
INFERENCE_PRIORITY = -1
#: Training micro-steps: CUDA's lowest priority.
TRAINING_PRIORITY = 0


def priority_stream(device: torch.device | str, priority: int) -> Any:
    """A new CUDA stream of ``priority`` on ``device``, or None on a device without streams."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.Stream(device, priority=priority)  # type: ignore[no-untyped-call]


@contextmanager
def fork_join(stream: Any) -> Iterator[None]:
    """Run the block's device work on ``stream``, ordered after the caller's current stream
    and before whatever the caller queues next; a plain block when ``stream`` is None."""
    if stream is None:
        yield
        return
    caller = torch.cuda.current_stream(stream.device)
    stream.wait_stream(caller)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        caller.wait_stream(stream)
