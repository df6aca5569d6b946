"""Vajra: a serverless runtime serving many tenants' LoRA adapters on one frozen base model."""

__version__ = "0.1.0"
