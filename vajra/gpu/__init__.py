"""Model execution: the continuous-batching engine, sampling, and a tiny test model.

Data flows left to right: GenerationRequest -> Engine.step() -> StepOutput. The executor sees an
engine only through :mod:`vajra.gpu.interface` (the step, and the adapter slots).
"""

from vajra.gpu.engine import TorchEngine
from vajra.gpu.interface import AdapterResidency, Engine, GenerationRequest, StepOutput
from vajra.gpu.loading import load_engine
from vajra.gpu.null_engine import NullEngine
from vajra.gpu.sampling import Sampler, SamplingParams
from vajra.gpu.tiny import init_tiny_model

__all__ = [
    "AdapterResidency",
    "Engine",
    "GenerationRequest",
    "NullEngine",
    "Sampler",
    "SamplingParams",
    "StepOutput",
    "TorchEngine",
    "init_tiny_model",
    "load_engine",
]
