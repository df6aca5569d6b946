"""Running a test module's kernel checks under Triton's interpreter, in a fresh process.

The interpreter must be switched on (``TRITON_INTERPRET=1``) before triton is first imported,
which the test process has long done; so the check runs as ``python -m MODULE`` with it set,
on CPU tensors, and prints ``marker`` once everything in it passed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def assert_passes_in_interpreter(
    module: str, marker: str, timeout_s: float = 240, args: tuple[str, ...] = ()
) -> None:
    """Run ``python -m module *args`` under the interpreter; fail with its stderr unless it
    exits 0 and printed ``marker``. Skips where triton does not import."""
    pytest.importorskip("triton")
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert marker in done.stdout, done.stdout[-2000:]
