"""Stream priorities: inference steps outrank training micro-steps; order is kept across them.

Rules: on the CPU there are no streams and ``fork_join`` is a plain block; on CUDA the block
runs on the given stream, after what the caller queued and before what it queues next.
"""

from __future__ import annotations

import pytest
import torch

from vajra.gpu.streams import INFERENCE_PRIORITY, TRAINING_PRIORITY, fork_join, priority_stream


def test_on_the_cpu_there_are_no_streams() -> None:
    assert priority_stream("cpu", INFERENCE_PRIORITY) is None
    assert INFERENCE_PRIORITY < TRAINING_PRIORITY  # lower numbers are higher priorities
    with fork_join(None):
        x = torch.ones(3) * 2
    assert x.tolist() == [2.0, 2.0, 2.0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fork_join_runs_on_the_stream_in_the_callers_order() -> None:
    stream = priority_stream("cuda", INFERENCE_PRIORITY)
    low = priority_stream("cuda", TRAINING_PRIORITY)
    assert stream.priority < low.priority
    caller = torch.cuda.current_stream()
    for _ in range(5):  # fresh data each time: a missed dependency shows as a wrong sum
        x = torch.randn(4096, 4096, device="cuda")
        y = x @ x  # queued on the caller's stream, long enough to still run at the fork
        with fork_join(stream):
            assert torch.cuda.current_stream() == stream
            z = y.sum(dim=0)  # needs y: the fork must wait for the caller
        assert torch.cuda.current_stream() == caller
        total = z.sum()  # on the caller's stream again: the join must wait for the block
        exact = x.double() @ x.double()
        scale = float(exact.abs().sum())  # the sum cancels: judge the error against its terms
        assert abs(float(total) - float(exact.sum())) <= 1e-4 * scale
