"""A real cluster with the HTTP bridge (`vajra up --http-port 0` via config) for the HTTP tests.

Test rules: loopback only; free ports; every HTTP call has a client timeout; the cluster is
stopped with SIGTERM at the end of the session and must exit 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import RunningCluster, start_cluster, stop_cluster

ADMIN_KEY = "admin-secret-for-tests"
MAX_TOKENS_LIMIT = 64
MAX_ADAPTER_BYTES = 262_144
CONFIG = f"""
[gateway]
max_prompt_chars = 2000
max_tokens_limit = {MAX_TOKENS_LIMIT}
tenant_rate_limit_per_s = 2000.0
tenant_rate_limit_burst = 2000
tenant_max_inflight = 1000

[http]
enabled = true
port = 0
admin_key = "{ADMIN_KEY}"
max_body_bytes = 65536

[adapters]
max_adapter_bytes = {MAX_ADAPTER_BYTES}
"""

_names = itertools.count()


@pytest.fixture(scope="session")
def http_cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[RunningCluster]:
    c = start_cluster(tmp_path_factory.mktemp("http-cluster"), tiny_model_dir, config_text=CONFIG)
    try:
        yield c
    finally:
        if c.process.poll() is None:
            stop_cluster(c)


@pytest.fixture(scope="session")
def base_url(http_cluster: RunningCluster) -> str:
    return str(http_cluster.info["http_address"])


@pytest.fixture(scope="session")
def model_name(tiny_model_dir: Path) -> str:
    return tiny_model_dir.name


def _create_tenant(base_url: str, prefix: str = "t") -> tuple[str, str]:
    name = f"{prefix}{next(_names)}"
    r = httpx.post(
        f"{base_url}/v1/admin/tenants",
        json={"name": name},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    body = r.json()
    return body["tenant_id"], body["api_key"]


@pytest.fixture(scope="session")
def make_tenant(base_url: str) -> Callable[[str], tuple[str, str]]:
    """Create a tenant over HTTP with the admin key; returns (tenant_id, api_key)."""
    return lambda prefix="t": _create_tenant(base_url, prefix)


@pytest.fixture(scope="session")
def tenant(base_url: str) -> tuple[str, str]:
    return _create_tenant(base_url, "main")


@pytest.fixture(scope="session")
def admin_key() -> str:
    return ADMIN_KEY


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A PEFT LoRA adapter (r=4 on q_proj and v_proj, random B) of the tiny model, as PEFT's
    ``save_pretrained`` writes it: adapter_config.json, adapter_model.safetensors, README.md."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter") / "tiny-lora"
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(out)
    return out
