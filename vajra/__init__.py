"""Vajra: a serverless runtime serving many tenants' LoRA adapters on one frozen base model."""

import os

# OpenMP threads that wait by spinning (libgomp's default) wreck torch on a CPU shared with
# other busy processes, as every Vajra actor process and the model thread are: with two
# threads on two busy cores, one tiny attention call measured 11.6 ms instead of 29 us,
# because each parallel region waits a whole scheduler slice for its descheduled partner.
# Waiting passively costs a wake-up per parallel region instead: on an idle machine two
# passive threads ran the tiny engine at 8,400 tokens/s against 13,400 spinning and 12,200
# with one thread, which is why executors on a CPU default to one thread per process
# (`executor.torch_threads`), where no region waits at all. It must be set before torch loads
# OpenMP, so here, before anything imports torch; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
