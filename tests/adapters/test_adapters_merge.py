"""An exact merge of two adapter versions (`vajra adapter merge`) against PEFT's own
``add_weighted_adapter(..., combination_type="cat")``, and the merges it must refuse.

Test rules: files only (no cluster); PEFT itself is the reference.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load
from transformers import AutoModelForCausalLM

from vajra.adapters.merge import merge_versions
from vajra.client._adapter_files import read_adapter_dir
from vajra.errors import InvalidRequest, VajraError


def _save(
    model_dir: Path,
    out: Path,
    *,
    r: int,
    alpha: float,
    targets: list[str],
    seed: int,
    **extra: object,
) -> Path:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra
    )  # type: ignore[arg-type]
    get_peft_model(base, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("merge")
    qv = ["q_proj", "v_proj"]
    first = _save(tiny_model_dir, root / "a", r=2, alpha=8, targets=qv, seed=1)
    second = _save(tiny_model_dir, root / "b", r=4, alpha=4, targets=qv, seed=2, use_rslora=True)
    return first, second


def test_the_merge_is_pefts_cat_combination(tiny_model_dir: Path, pair: tuple[Path, Path]) -> None:
    first, second = pair
    weights = (0.7, -0.3)
    config_json, weights_bytes = merge_versions(
        read_adapter_dir(first), read_adapter_dir(second), weights
    )
    config = json.loads(config_json)
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (6, 6, False)
    ours = load(weights_bytes)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(copy.deepcopy(base), first, adapter_name="a")
    model.load_adapter(second, adapter_name="b")
    model.add_weighted_adapter(["a", "b"], list(weights), "m", combination_type="cat")
    theirs = get_peft_model_state_dict(model, adapter_name="m")
    assert set(ours) == set(theirs) and ours
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-7)
    # The merged update is the weighted sum of the two updates, module by module.
    a, b = load(read_adapter_dir(first)[1]), load(read_adapter_dir(second)[1])
    for name in ours:
        if name.endswith(".lora_A.weight"):
            bname = name.replace("lora_A", "lora_B")
            merged = ours[bname] @ ours[name]  # scaling 1
            expect = 0.7 * (8 / 2) * a[bname] @ a[name] - 0.3 * (4 / 2) * b[bname] @ b[name]
            torch.testing.assert_close(merged, expect, rtol=1e-5, atol=1e-6)


def test_merges_that_cannot_be_exact_are_refused(
    tiny_model_dir: Path, pair: tuple[Path, Path], tmp_path: Path
) -> None:
    first, second = pair
    a, b = read_adapter_dir(first), read_adapter_dir(second)
    other = _save(tiny_model_dir, tmp_path / "k", r=2, alpha=4, targets=["k_proj"], seed=3)
    patterned = _save(
        tiny_model_dir,
        tmp_path / "p",
        r=2,
        alpha=4,
        targets=["q_proj", "v_proj"],
        seed=4,
        rank_pattern={"q_proj": 4},
    )
    cases = [
        (a, read_adapter_dir(other), (0.5, 0.5), "versions"),
        (a, read_adapter_dir(patterned), (0.5, 0.5), "versions"),
        (a, b, (0.0, 0.0), "weights"),
        (a, b, (float("nan"), 1.0), "weights"),
        (a, b, (float("inf"), 1.0), "weights"),
        (a, b, (True, 1.0), "weights"),
    ]
    for x, y, w, field in cases:
        with pytest.raises(InvalidRequest) as err:
            merge_versions(x, y, w)  # type: ignore[arg-type]
        assert err.value.field == field, (w, err.value)
    # Files that are not an adapter at all: a typed error, never a crash.
    with pytest.raises(VajraError):
        merge_versions((b"{}", a[1]), b, (0.5, 0.5))
    with pytest.raises(VajraError):
        merge_versions((a[0], b"not safetensors"), b, (0.5, 0.5))
