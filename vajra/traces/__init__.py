"""Recorded and synthetic request traces, as columnar numpy :class:`Trace` objects.

Loaders read local files only (``load_trace``); ``synthetic_slora`` makes S-LoRA-style
traffic; ``map_to_adapters`` and ``Trace.scaled`` turn any of them into the adapter-indexed,
time-compressed stream that ``vajra replay`` and the simulator drive. Samples of the public
traces ship with the package (``bundled``). Every fault in an input file raises
:class:`TraceError` naming the row and column.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from vajra.traces._functions import load_azure_functions_2019, load_azure_functions_2021
from vajra.traces._llm import load_azure_llm, parse_timestamps
from vajra.traces._mapping import MappingMode, map_to_adapters
from vajra.traces._synthetic import TokenSpec, synthetic_slora
from vajra.traces._trace import Arrival, Trace, TraceError

__all__ = [
    "FORMATS",
    "Arrival",
    "MappingMode",
    "TokenSpec",
    "Trace",
    "TraceError",
    "bundled",
    "load_trace",
    "map_to_adapters",
    "parse_timestamps",
    "synthetic_slora",
]

FORMATS = ("azure-functions-2019", "azure-functions-2021", "azure-llm-2023", "azure-llm-2024")

# name -> file or directory under vajra/traces/data
_BUNDLED = {
    "azure_functions_2019_1000": "azure_functions_2019_1000",
    "azure_functions_2019_one_function": "azure_functions_2019_one_function",
    "azure_functions_2021_200": "Azure2021_200.csv",
    "azure_llm_2023_code": "AzureLLMInferenceTrace_code.csv.gz",
    "azure_llm_2023_conv": "AzureLLMInferenceTrace_conv.csv.gz",
}


def load_trace(path: str | Path, format: str, **opts: Any) -> Trace:
    """Load the trace at ``path`` (a file, or for ``azure-functions-2019`` a directory).

    ``opts`` go to the format's loader (see ``_functions`` and ``_llm``): for the function
    traces ``group_by``, ``seed``, ``prompt_tokens``, ``output_tokens`` and, for 2019,
    ``durations``, ``memory``, ``spread``, ``max_arrivals``; for the LLM traces ``source``.
    Raises :class:`TraceError` for an unknown format, an unknown option or bad input.
    """
    p = Path(path)
    loader: Callable[..., Trace]
    if format == "azure-functions-2019":
        for key in ("durations", "memory"):
            if opts.get(key) is not None:
                opts[key] = Path(opts[key])
        loader = load_azure_functions_2019
    elif format == "azure-functions-2021":
        loader = load_azure_functions_2021
    elif format in ("azure-llm-2023", "azure-llm-2024"):
        opts["year"] = int(format[-4:])
        loader = load_azure_llm
    else:
        raise TraceError(
            f"unknown trace format {format!r}; one of {', '.join(FORMATS)}", column="format"
        )
    try:
        inspect.signature(loader).bind(p, **opts)
    except TypeError as exc:
        raise TraceError(f"{format}: {exc}", column="opts") from None
    return loader(p, **opts)


def bundled(name: str) -> Path:
    """Path of a trace sample shipped in the package (see ``vajra/traces/data/README.md``).

    Raises :class:`TraceError` for a name that is not one of the samples.
    """
    try:
        rel = _BUNDLED[name]
    except KeyError:
        raise TraceError(f"no bundled trace {name!r}; one of {', '.join(_BUNDLED)}") from None
    root = Path(str(resources.files("vajra.traces") / "data"))
    return root / rel
