"""What a training job starts from: its dataset, tokenized, and the weights it continues.

Both run in worker threads (parsing, hashing, tokenizing and safetensors loads never run on
the event loop). An executor does not trust the job record: the dataset is parsed and its
digest checked again (the gateway did so before it queued the job), and the starting version
is looked up under the job's own tenant, so another tenant's adapter answers exactly like a
missing one (NotFoundError).

Errors: :class:`~vajra.training.dataset.InvalidDataset` naming the line and field (not JSON
Lines, a missing field, an empty file, over the size limit, a line over the model's context
or ``max_micro_tokens``, bytes that do not match the recorded digest); NotFoundError for an
unknown adapter version or a missing object; InvalidRequest for a version made for another
base model or an invalid object key.
"""

from __future__ import annotations

from typing import Any

from vajra.config import TrainingConfig
from vajra.errors import InvalidRequest
from vajra.policies.training import TrainParams
from vajra.state import ClusterState
from vajra.state.jobs import JobRecord
from vajra.storage import ObjectStore, check_key, get_adapter_objects
from vajra.training.dataset import InvalidDataset, dataset_digest, parse_dataset

__all__ = ["check_dataset_key", "prepare_examples", "starting_weights"]


def check_dataset_key(key: str) -> str:
    """The object-store key of a job's dataset; InvalidRequest for anything else."""
    if not key:
        raise InvalidRequest("the job has no dataset", field="dataset")
    return check_key(key)


def prepare_examples(
    tcfg: TrainingConfig, engine: Any, rec: JobRecord, params: TrainParams, data: bytes
) -> list[Any]:
    """Check the digest, parse and tokenize ``data`` for ``engine``'s tokenizer and context."""
    from vajra.gpu.training import tokenize_examples

    if rec.dataset_digest and dataset_digest(data) != rec.dataset_digest:
        raise InvalidDataset("the stored dataset does not match its digest")
    examples = parse_dataset(data, max_bytes=tcfg.max_dataset_bytes, max_examples=tcfg.max_examples)
    max_len = min(int(engine.max_model_len), params.max_micro_tokens)
    return tokenize_examples(examples, engine.tokenizer, max_len=max_len)


def starting_weights(
    state: ClusterState, store: ObjectStore, rec: JobRecord, base_model: str
) -> tuple[dict[str, Any], float]:
    """The PEFT tensors and ``lora_alpha`` of version ``rec.from_version`` of the job's
    adapter, for its own tenant."""
    from safetensors.torch import load

    if rec.from_version is None:
        raise InvalidRequest("the job starts from a fresh adapter", field="from_version")
    version = state.adapters.get(rec.tenant_id, rec.adapter, rec.from_version)
    if version.base_model != base_model:
        raise InvalidRequest(
            f"adapter {rec.adapter}@{rec.from_version} was made for {version.base_model}, "
            f"not {base_model}",
            field="adapter",
        )
    _config, weights = get_adapter_objects(store, version.object_key)
    return dict(load(weights)), version.lora_alpha
