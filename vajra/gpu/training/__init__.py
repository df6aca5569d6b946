"""LoRA fine-tuning on the engine's frozen core (torch side).

Data flows left to right: parsed examples (:mod:`vajra.training`) -> ``tokenize_examples``
(token ids + loss mask) -> :class:`LoraTrainer` (micro-steps on the engine's own modules, no
copy of the base) -> ``adapter_tensors`` / ``adapter_config`` (a PEFT adapter) ; the
:class:`Interleaver` runs micro-steps between inference steps on the model thread.
"""

from vajra.gpu.training.interleave import Interleaver, Ran
from vajra.gpu.training.tokenize import TrainExample, tokenize_examples
from vajra.gpu.training.trainer import LoraTrainer, StepReport

__all__ = [
    "Interleaver",
    "LoraTrainer",
    "Ran",
    "StepReport",
    "TrainExample",
    "tokenize_examples",
]
