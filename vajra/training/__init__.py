"""Fine-tuning jobs' pure parts: dataset parsing and validation (no torch, no I/O)."""

from vajra.training.dataset import (
    CHAT_ROLES,
    Example,
    InvalidDataset,
    dataset_digest,
    parse_dataset,
)

__all__ = ["CHAT_ROLES", "Example", "InvalidDataset", "dataset_digest", "parse_dataset"]
