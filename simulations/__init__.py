"""Discrete-event simulations of a Vajra cluster (trace-driven); filled by the simulation issue."""
