"""The paged-KV engine's own guarantees, on the tiny model (CPU, float32, greedy).

Against transformers' greedy ``generate`` run one prompt at a time: mixed prompt lengths
arriving at random steps with chunked prefill; preemption under a KV budget far smaller than
the load; the prefix cache (a shared system prompt hits it and changes nothing); KV-aware
admission; and running streams keep getting a token every step while a long prompt is read.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from vajra.gpu.engine import TorchEngine
from vajra.gpu.interface import GenerationRequest, StepOutput
from vajra.gpu.sampling import SamplingParams

WORDS = [
    "the",
    "river",
    "town",
    "woke",
    "slowly",
    "on",
    "the",
    "first",
    "cold",
    "morning",
    "of",
    "autumn",
    "fishermen",
    "pushed",
    "their",
    "boats",
    "into",
    "grey",
    "water",
    "while",
    "the",
    "baker",
    "pulled",
    "loaves",
    "from",
    "an",
    "oven",
    "17",
    "23",
    "42",
    "harbour",
]


def prompt_of(tokenizer: Any, num_tokens: int, seed: int) -> str:
    """A prompt of about ``num_tokens`` tokens (BOS included)."""
    rng = random.Random(seed)
    words = " ".join(rng.choice(WORDS) for _ in range(num_tokens))  # >= 1 token per word
    ids = tokenizer(words).input_ids[:num_tokens]
    text: str = tokenizer.decode(ids, skip_special_tokens=True)
    return text


def greedy(reference: tuple[Any, Any], prompt: str, max_new_tokens: int) -> list[int]:
    model, tokenizer = reference
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
        )
    return list(out[0, ids.shape[1] :].tolist())


def drive(
    engine: TorchEngine,
    admit: dict[int, list[GenerationRequest]],
    per_step: list[list[StepOutput]] | None = None,
) -> dict[str, list[StepOutput]]:
    outputs: dict[str, list[StepOutput]] = defaultdict(list)
    last = max(admit, default=0)
    step = 0
    while step <= last or engine.has_work():
        produced = engine.step(admit.get(step, []), [])
        for out in produced:
            assert out.error is None, out.error
            outputs[out.request_id].append(out)
        if per_step is not None:
            per_step.append(produced)
        step += 1
        assert step < 5000
    return outputs


def tokens(outs: list[StepOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def test_mixed_lengths_at_random_times_equal_generate(
    tiny_model_dir: Path, reference: tuple[Any, Any]
) -> None:
    _, tokenizer = reference
    engine = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=6, max_batch_tokens=96)
    rng = random.Random(7)
    lengths = [1, 2, 15, 16, 17, 40, 130, 333, 700, 1500]
    admit: dict[int, list[GenerationRequest]] = defaultdict(list)
    expected: dict[str, list[int]] = {}
    for i, n in enumerate(lengths):
        prompt = "" if n == 1 else prompt_of(tokenizer, n, seed=i)
        max_tokens = rng.choice([1, 5, 12])
        rid = f"r{i}"
        admit[rng.randrange(0, 30)].append(
            GenerationRequest(rid, prompt, SamplingParams(max_tokens=max_tokens))
        )
        expected[rid] = greedy(reference, prompt, max_tokens)
    outputs = drive(engine, admit)
    for rid, want in expected.items():
        got = tokens(outputs[rid])
        assert got == want[: len(got)], rid
        assert outputs[rid][-1].finished


def test_preemption_under_a_tiny_kv_budget_changes_no_output(
    tiny_model_dir: Path, reference: tuple[Any, Any]
) -> None:
    """64 requests of 500 tokens against a cache that holds eight of them at once, and then
    not quite: the eight grow past it while they decode, so the newest are preempted."""
    _, tokenizer = reference
    prompts = [prompt_of(tokenizer, 500, seed=100 + i) for i in range(64)]
    requests = [
        GenerationRequest(f"p{i}", p, SamplingParams(max_tokens=24)) for i, p in enumerate(prompts)
    ]
    roomy = TorchEngine(
        tiny_model_dir, device="cpu", max_batch_size=64, max_model_len=600, max_batch_tokens=1024
    )
    bytes_per_block = roomy.kv.nbytes // roomy.kv.num_blocks
    tight = TorchEngine(
        tiny_model_dir,
        device="cpu",
        max_batch_size=64,
        max_model_len=600,
        max_batch_tokens=1024,
        kv_cache_bytes=260 * bytes_per_block,  # 4,160 token positions for 33,500 wanted
    )
    want = drive(roomy, {0: requests})
    got = drive(tight, {0: requests})
    assert tight.kv_stats()["preemptions"] > 0
    assert tight.kv_stats()["total_blocks"] == 260
    for rid, outs in want.items():
        assert tokens(got[rid]) == tokens(outs), rid
        assert got[rid][-1].finish_reason == outs[-1].finish_reason


def test_kv_aware_admission_makes_requests_wait_instead_of_failing(
    tiny_model_dir: Path, reference: tuple[Any, Any]
) -> None:
    _, tokenizer = reference
    probe = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=2, max_model_len=300)
    per_block = probe.kv.nbytes // probe.kv.num_blocks
    engine = TorchEngine(
        tiny_model_dir,
        device="cpu",
        max_batch_size=16,
        max_model_len=300,
        kv_cache_bytes=40 * per_block,
    )
    prompts = [prompt_of(tokenizer, 200, seed=i) for i in range(6)]
    first = engine.step(
        [
            GenerationRequest(f"w{i}", p, SamplingParams(max_tokens=4))
            for i, p in enumerate(prompts)
        ],
        [],
    )
    assert not [o for o in first if o.error]
    assert engine.num_waiting() > 0  # 6 x 13 blocks do not fit in 40
    outputs = drive(engine, {})
    for i, p in enumerate(prompts):
        got = [
            t
            for o in first + [o for outs in outputs.values() for o in outs]
            if o.request_id == f"w{i}"
            for t in o.token_ids
        ]
        assert got == greedy(reference, p, 4)


def test_running_streams_get_a_token_every_step_while_a_long_prompt_is_read(
    tiny_model_dir: Path, reference: tuple[Any, Any]
) -> None:
    _, tokenizer = reference
    engine = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=16, max_batch_tokens=128)
    streams = [
        GenerationRequest(f"s{i}", prompt_of(tokenizer, 20, seed=i), SamplingParams(max_tokens=60))
        for i in range(8)
    ]
    long_prompt = prompt_of(tokenizer, 1500, seed=99)
    per_step: list[list[StepOutput]] = []
    outputs = drive(
        engine,
        {0: streams, 3: [GenerationRequest("long", long_prompt, SamplingParams(max_tokens=3))]},
        per_step,
    )
    first_long = next(
        i for i, outs in enumerate(per_step) if any(o.request_id == "long" for o in outs)
    )
    assert first_long >= 3 + 1500 // 128  # read over several steps
    for step in range(3, first_long + 1):
        moved = {o.request_id for o in per_step[step]}
        assert {f"s{i}" for i in range(8)} <= moved, step  # every stream moved in every step
    assert tokens(outputs["long"]) == greedy(reference, long_prompt, 3)


def test_a_shared_system_prompt_hits_the_prefix_cache_and_changes_nothing(
    tiny_model_dir: Path, reference: tuple[Any, Any]
) -> None:
    _, tokenizer = reference
    engine = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=8)
    system = prompt_of(tokenizer, 500, seed=5)
    asks = [f"{system} question {i}: {WORDS[i]}" for i in range(8)]
    admit = {0: [GenerationRequest("q0", asks[0], SamplingParams(max_tokens=6))]}
    admit[2] = [
        GenerationRequest(f"q{i}", a, SamplingParams(max_tokens=6)) for i, a in enumerate(asks) if i
    ]
    outputs = drive(engine, admit)
    stats = engine.kv_stats()
    assert stats["prefix_hits"] >= 7 * (500 // 16 - 1)
    assert stats["prefix_hit_rate"] > 0.8
    for i, a in enumerate(asks):
        assert tokens(outputs[f"q{i}"]) == greedy(reference, a, 6)


def test_identical_prompts_admitted_together_compute_their_prefix_once(
    tiny_model_dir: Path, reference: tuple[Any, Any]
) -> None:
    """What ``n`` > 1 relies on: the second copy waits for the first's blocks."""
    _, tokenizer = reference
    engine = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=8)
    prompt = prompt_of(tokenizer, 300, seed=11)
    copies = [GenerationRequest(f"n{i}", prompt, SamplingParams(max_tokens=5)) for i in range(4)]
    outputs = drive(engine, {0: copies})
    assert engine.kv_stats()["prefix_hits"] >= 3 * (300 // 16 - 1)
    want = greedy(reference, prompt, 5)
    for i in range(4):
        assert tokens(outputs[f"n{i}"]) == want


def test_kv_memory_is_allocated_once_from_the_budget(tiny_model_dir: Path) -> None:
    probe = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=2, max_model_len=256)
    per_block = probe.kv.nbytes // probe.kv.num_blocks
    engine = TorchEngine(
        tiny_model_dir,
        device="cpu",
        max_batch_size=2,
        max_model_len=256,
        kv_cache_bytes=50 * per_block,
    )
    assert engine.kv_stats()["allocated_bytes"] == 51 * per_block  # + the graphs' scratch
    before = [t.data_ptr() for t in engine.kv.k]
    drive(engine, {0: [GenerationRequest("a", "hello there", SamplingParams(max_tokens=8))]})
    assert [t.data_ptr() for t in engine.kv.k] == before
    assert engine.kv_stats()["used_blocks"] == 0
    with pytest.raises(ValueError, match="cannot hold one request"):
        TorchEngine(tiny_model_dir, device="cpu", max_model_len=256, kv_cache_bytes=per_block)


@pytest.mark.parametrize("failing", ["decode", "kv write"])
def test_a_decode_kernel_that_cannot_be_built_leaves_the_torch_path_serving(
    tiny_model_dir: Path,
    reference: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """A Triton that cannot build the decode kernel or the KV write kernel (here: its launch
    raises ``OutOfResources``, as too many registers would) is recorded once; the step falls
    back to torch for both, unchanged."""
    triton_errors = pytest.importorskip("triton.runtime.errors")
    from vajra.gpu import paged_attention

    cpu = torch.device("cpu")
    calls = []

    def unbuildable(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        raise triton_errors.OutOfResources(300_000, 232_448, "shared memory")

    def torch_write(k_blocks: Any, v_blocks: Any, slots: Any, new_k: Any, new_v: Any) -> None:
        for blocks, new in ((k_blocks, new_k), (v_blocks, new_v)):
            blocks.view(-1, *blocks.shape[2:]).index_copy_(0, slots, new)

    def never(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("the decode kernel ran after the KV write failed to build")

    decode, write = (unbuildable, torch_write) if failing == "decode" else (never, unbuildable)
    monkeypatch.setitem(paged_attention._kernels, cpu, decode)
    monkeypatch.setattr(paged_attention, "write_kv", write)
    monkeypatch.setattr(paged_attention, "_kernel_errors", {})
    _, tokenizer = reference
    engine = TorchEngine(tiny_model_dir, device="cpu", max_batch_size=2)
    prompts = {f"k{i}": prompt_of(tokenizer, 9 + 7 * i, seed=40 + i) for i in range(2)}
    admit = {0: [GenerationRequest(r, p, SamplingParams(max_tokens=6)) for r, p in prompts.items()]}
    outputs = drive(engine, admit)
    for rid, prompt in prompts.items():
        assert tokens(outputs[rid]) == greedy(reference, prompt, 6), rid
    assert len(calls) == 1  # tried once, then the torch path for good
    assert paged_attention._kernels[cpu] is None
    error = paged_attention.decode_kernel_error("cpu")
    assert error is not None and error.startswith("OutOfResources")
