"""Vajra: a serverless runtime serving many tenants' LoRA adapters on one frozen base model."""

import os

# OpenMP threads that wait by spinning (libgomp's default) wreck torch on a CPU shared with
# other busy processes, as every Vajra actor process and the model thread are: with two
# threads on two busy cores, one tiny attention call measured 11.6 ms instead of 29 us,
# because each parallel region waits a whole scheduler slice for its descheduled partner.
# Waiting passively costs a few microseconds per region on an idle machine. It must be set
# before torch loads OpenMP, so here, before anything imports torch; an explicit setting in
# the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
