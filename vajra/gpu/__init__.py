"""Model execution: the continuous-batching engine, sampling, and a tiny test model.

Data flows left to right: GenerationRequest -> Engine.step() -> StepOutput.
"""

from vajra.gpu.engine import (
    Engine,
    GenerationRequest,
    NullEngine,
    StepOutput,
    TorchEngine,
    load_engine,
)
from vajra.gpu.sampling import SamplingParams, sample_next_tokens
from vajra.gpu.tiny import init_tiny_model

__all__ = [
    "Engine",
    "GenerationRequest",
    "NullEngine",
    "SamplingParams",
    "StepOutput",
    "TorchEngine",
    "init_tiny_model",
    "load_engine",
    "sample_next_tokens",
]
