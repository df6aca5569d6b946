"""The actors, each its own OS process with one Trio loop: ``vajra actor NAME --config FILE``."""

from __future__ import annotations

from vajra.actors.runner import ACTOR_NAMES, run_actor_process

__all__ = ["ACTOR_NAMES", "run_actor_process"]
