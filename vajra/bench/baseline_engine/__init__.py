"""The engine before the paged-KV rewrite, kept only as the engine benchmark's baseline (c).

``vajra bench engine`` (:mod:`vajra.bench.engine`) runs :class:`BaselineEngine` beside the
current engine in the same run. It is a self-contained copy of the torch engine, its padded KV
batch, its text stream and its sampling functions as they were before the rewrite, base model
only; it imports only the engine interface types and the model loader from :mod:`vajra.gpu`.
"""

from vajra.bench.baseline_engine.engine import BaselineEngine, load_baseline_engine

__all__ = ["BaselineEngine", "load_baseline_engine"]
