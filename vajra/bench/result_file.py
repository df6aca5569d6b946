"""How every benchmark writes its JSON: whole files only, the latest result so far.

A benchmark writes its result after each part it finishes (marked ``"partial": true``) and once
more at the end (unmarked), so a run cut short by a time limit, ``kill -9`` included, leaves
every figure it measured. Each write goes to a temporary file in the same folder that then
replaces the result in one rename: a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: The callback a benchmark hands its result so far (see :func:`partial_writer`).
Progress = Callable[[Mapping[str, Any]], None]
#: How the temporary files of :func:`write_result` end (their names start with a dot).
_TEMPORARY = ".tmp"


def write_result(path: Path, result: Mapping[str, Any], *, partial: bool = False) -> None:
    """Write ``result`` as indented JSON to ``path`` (its folder created), in one rename;
    ``partial`` marks a result that later parts of the run would have added to."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"partial": True, **result} if partial else dict(result)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMPORARY, dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def partial_writer(path: Path | None) -> Progress:
    """The progress callback that writes each result so far to ``path`` (none: a no-op)."""
    if path is None:
        return lambda _: None
    return lambda result: write_result(path, result, partial=True)


def is_partial(result: Mapping[str, Any]) -> bool:
    """Whether a result read back was written before its run finished."""
    return result.get("partial") is True


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files that writes killed midway left in ``folder``."""
    for leftover in folder.glob(f".*.json.*{_TEMPORARY}"):
        leftover.unlink(missing_ok=True)
