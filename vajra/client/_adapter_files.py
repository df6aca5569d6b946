"""Reading a PEFT adapter directory for upload: its two files, and nothing pickled."""

from __future__ import annotations

import os
from pathlib import Path

from vajra.errors import InvalidRequest

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def read_adapter_dir(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(adapter_config.json, adapter_model.safetensors)`` bytes of a PEFT adapter directory.

    ``path`` may also name either file inside it. Raises InvalidRequest (field ``path``) when
    a file is missing; a directory holding only a pickled ``adapter_model.bin`` is refused
    here, since only safetensors is accepted.
    """
    p = Path(path)
    if p.is_file():
        p = p.parent
    config, weights = p / ADAPTER_CONFIG_FILE, p / ADAPTER_WEIGHTS_FILE
    if not config.is_file():
        raise InvalidRequest(f"{p} has no {ADAPTER_CONFIG_FILE}", field="path")
    if not weights.is_file():
        if (p / "adapter_model.bin").exists():
            raise InvalidRequest(
                f"{p} holds adapter_model.bin (a pickle); only safetensors is accepted: "
                "save with safe_serialization=True",
                field="path",
            )
        raise InvalidRequest(f"{p} has no {ADAPTER_WEIGHTS_FILE}", field="path")
    return config.read_bytes(), weights.read_bytes()
