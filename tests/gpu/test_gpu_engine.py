"""The continuous-batching engine against plain transformers, on the tiny model (CPU).

Rules: every engine here runs on the CPU in float32, so that its greedy tokens can be compared
token for token with ``model.generate`` run one prompt at a time. Prompts are encoded the same
way in both: ``tokenizer(prompt)``, which puts BOS in front.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vajra.errors import InternalError, InvalidRequest
from vajra.gpu import (
    GenerationRequest,
    NullEngine,
    SamplingParams,
    StepOutput,
    TorchEngine,
    load_engine,
)

PROMPTS = [
    "",
    "Hi",
    "The river town woke slowly on the first cold morning of autumn.",
    "12 + 30 = ",
    "Servers answer requests; models predict the next word; a tokenizer splits text",
    "日本語のテキスト 🚀 and some emoji 🎉🎉",
    "a" * 40,
    "The",
    "Punctuation matters too - commas, full stops, colons: semicolons; brackets [like these]"
    " and (these), quotes 'single' and \"double\", the ampersand &, the hash #.",
    "Lamps were lit one by one along the water",
    "zzqx wvv jjj kkk",
    "He answered every letter, sometimes correctly, and always with a drawing of the harbour. " * 3,
]
MAX_TOKENS = [5, 20, 12, 30, 7, 16, 25, 3, 9, 14, 1, 18]
ADMIT_AT_STEP = [0, 0, 0, 2, 3, 3, 3, 6, 9, 9, 15, 16]

Outputs = dict[str, list[StepOutput]]


def run(
    engine: TorchEngine,
    admit: dict[int, list[GenerationRequest]],
    abort: dict[int, list[str]] | None = None,
    trace: list[tuple[int, int]] | None = None,
) -> Outputs:
    """Step ``engine`` until idle, admitting and aborting at the given steps.

    ``trace`` collects (running, waiting) after every step.
    """
    abort = abort or {}
    trace = [] if trace is None else trace
    outputs: Outputs = defaultdict(list)
    last = max([*admit, *abort], default=0)
    step = 0
    while step <= last or engine.has_work():
        for out in engine.step(admit.get(step, []), abort.get(step, [])):
            assert not (outputs[out.request_id] and outputs[out.request_id][-1].finished)
            outputs[out.request_id].append(out)
        assert engine.num_running() <= engine.max_batch_size
        trace.append((engine.num_running(), engine.num_waiting()))
        step += 1
        assert step < 1000
    return outputs


def token_ids(outputs: Sequence[StepOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


def text(outputs: Sequence[StepOutput]) -> str:
    return "".join(out.text_delta for out in outputs)


def greedy_reference(reference: tuple[Any, Any], prompt: str, max_new_tokens: int) -> list[int]:
    model, tokenizer = reference
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    generated: list[int] = out[0, input_ids.shape[1] :].tolist()
    return generated


def request(rid: str, prompt: str, **params: Any) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(**params))


@pytest.fixture
def engine(tiny_model_dir: Path) -> TorchEngine:
    return TorchEngine(tiny_model_dir, device="cpu", max_batch_size=5)


def test_continuous_batching_matches_generate_token_for_token(
    engine: TorchEngine, reference: tuple[Any, Any]
) -> None:
    _, tokenizer = reference
    admit: dict[int, list[GenerationRequest]] = defaultdict(list)
    for i, (prompt, n, at) in enumerate(zip(PROMPTS, MAX_TOKENS, ADMIT_AT_STEP, strict=True)):
        admit[at].append(request(f"r{i}", prompt, max_tokens=n))

    trace: list[tuple[int, int]] = []
    outputs = run(engine, admit, trace=trace)

    assert not engine.has_work()
    assert max(running for running, _ in trace) == engine.max_batch_size
    assert any(waiting > 0 for _, waiting in trace)  # some had to wait for a slot
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True)):
        outs = outputs[f"r{i}"]
        expected = greedy_reference(reference, prompt, n)
        assert token_ids(outs) == expected, f"r{i}"
        assert text(outs) == tokenizer.decode(expected, skip_special_tokens=True)
        assert [out.finished for out in outs] == [False] * (len(outs) - 1) + [True]
        assert all(len(out.token_ids) == 1 for out in outs)  # one token per step
        assert outs[-1].finish_reason == "length"
        assert outs[-1].completion_tokens == n
        assert outs[-1].prompt_tokens == len(tokenizer(prompt).input_ids)
        times = [out.compute_ms for out in outs]
        assert times[0] > 0 and times == sorted(times)


def test_rows_wait_for_a_slot_and_join_mid_decode(engine: TorchEngine) -> None:
    first = [request(f"a{i}", "The river" * (i + 1), max_tokens=6) for i in range(7)]
    engine.step(first, [])
    assert (engine.num_running(), engine.num_waiting()) == (5, 2)
    engine.step([request("late", "Hi", max_tokens=3)], [])
    assert (engine.num_running(), engine.num_waiting()) == (5, 3)
    outputs = run(engine, {})
    assert all(outputs[r.request_id][-1].finished for r in first)
    assert engine.num_running() == engine.num_waiting() == 0


def test_eos_stops_with_reason_stop_and_adds_no_text(
    tiny_model_dir: Path, tmp_path: Path, reference: tuple[Any, Any]
) -> None:
    _, tokenizer = reference
    prompt = "Lamps were lit"
    greedy = greedy_reference(reference, prompt, 12)
    k = next(i for i in range(3, 12) if greedy[i] not in greedy[:i])
    # A copy of the model whose generation config counts greedy[k] as an end-of-sequence token.
    eos_dir = tmp_path / "eos"
    shutil.copytree(tiny_model_dir, eos_dir)
    config_path = eos_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, greedy[k]]
    config_path.write_text(json.dumps(config))

    engine = TorchEngine(eos_dir, device="cpu")
    outs = run(engine, {0: [request("r", prompt, max_tokens=12)]})["r"]
    assert token_ids(outs) == greedy[: k + 1]
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].completion_tokens == k + 1
    assert text(outs) == tokenizer.decode(greedy[:k], skip_special_tokens=True)


def test_stop_strings_cut_the_text_before_the_earliest_match(
    engine: TorchEngine, reference: tuple[Any, Any]
) -> None:
    _, tokenizer = reference
    prompt = "The station master wrote"
    full = tokenizer.decode(greedy_reference(reference, prompt, 30), skip_special_tokens=True)
    assert len(full) > 40
    early, late = full[15:19], full[25:27]
    cut = min(full.find(early), full.find(late))
    outputs = run(
        engine,
        {
            0: [
                request("both", prompt, max_tokens=30, stop=(late, early)),
                request("late", prompt, max_tokens=30, stop=(late,)),
                request("never", prompt, max_tokens=30, stop=("\x00never",)),
            ]
        },
    )
    assert text(outputs["both"]) == full[:cut]
    assert outputs["both"][-1].finish_reason == "stop"
    assert outputs["both"][-1].completion_tokens < 30
    assert text(outputs["late"]) == full[: full.find(late)]
    assert text(outputs["never"]) == full
    assert outputs["never"][-1].finish_reason == "length"


def test_max_tokens_one_finishes_in_the_prefill_step(engine: TorchEngine) -> None:
    outs = engine.step([request("r", "Hi", max_tokens=1)], [])
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "length"
    assert outs[0].completion_tokens == 1 and not engine.has_work()


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: TorchEngine) -> None:
    prompt = "Questions, answers, stories"

    def sampled(rid: str, seed: int) -> GenerationRequest:
        return request(rid, prompt, max_tokens=20, temperature=1.0, top_p=0.9, seed=seed)

    alone = run(engine, {0: [sampled("s", 7)]})["s"]
    again = run(engine, {0: [sampled("s", 7)]})["s"]
    busy = run(
        engine,
        {
            0: [request("g1", "Hi", max_tokens=5), sampled("other", 8)],
            2: [sampled("s", 7), request("g2", "The river town", max_tokens=30)],
            4: [sampled("third", 9)],
        },
    )
    assert token_ids(alone) == token_ids(again) == token_ids(busy["s"])
    assert text(alone) == text(busy["s"])
    assert token_ids(busy["other"]) != token_ids(alone)


def test_tiny_top_p_equals_greedy(engine: TorchEngine, reference: tuple[Any, Any]) -> None:
    prompt = "The teacher opened the windows"
    outs = run(engine, {0: [request("r", prompt, max_tokens=15, temperature=2.0, top_p=1e-9)]})
    assert token_ids(outs["r"]) == greedy_reference(reference, prompt, 15)


def test_abort_removes_a_row_and_the_rest_are_unchanged(
    tiny_model_dir: Path, reference: tuple[Any, Any]
) -> None:
    engine_dir = tiny_model_dir
    prompts = {"a": "The river town", "b": "A small train arrived", "c": "In the afternoon"}
    admit = {0: [request(rid, p, max_tokens=15) for rid, p in prompts.items()]}
    admit[1] = [request("queued", "Hi", max_tokens=5)]
    engine = TorchEngine(engine_dir, device="cpu", max_batch_size=3)
    outputs = run(engine, admit, abort={4: ["b", "queued", "unknown"]})
    # b: four tokens, then one final "abort" output with what it computed (for billing)
    assert len(outputs["b"]) == 5 and not any(o.finished for o in outputs["b"][:4])
    final = outputs["b"][-1]
    assert final.finished and final.finish_reason == "abort" and final.error is None
    assert final.token_ids == () and final.completion_tokens == 4 and final.compute_ms > 0
    # queued (never prefilled): an abort output with nothing computed; unknown: nothing
    (queued,) = outputs["queued"]
    assert queued.finish_reason == "abort" and queued.completion_tokens == 0
    assert queued.compute_ms == 0.0
    assert "unknown" not in outputs
    for rid in ("a", "c"):
        assert token_ids(outputs[rid]) == greedy_reference(reference, prompts[rid], 15)


def test_abort_of_the_last_row_empties_the_batch(engine: TorchEngine) -> None:
    engine.step([request("r", "Hi", max_tokens=10)], [])
    (out,) = engine.step([], ["r"])
    assert out.request_id == "r" and out.finished and out.finish_reason == "abort"
    assert out.completion_tokens == 1
    assert not engine.has_work()


def test_a_request_aborted_in_the_step_that_admits_it_never_runs(engine: TorchEngine) -> None:
    (out,) = engine.step([request("r", "Hi", max_tokens=10)], ["r"])
    assert out.finish_reason == "abort" and out.completion_tokens == 0
    assert not engine.has_work()


def test_a_row_whose_logits_are_nan_ends_alone_with_an_error(
    engine: TorchEngine, reference: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupt adapter's row must not take the batch (or the engine) down with it."""
    prompts = {"a": "The river town", "bad": "A small train arrived", "c": "In the afternoon"}
    real_forward = engine._forward

    def forward(step: Any) -> torch.Tensor:
        logits = real_forward(step)
        for i, (seq, _) in enumerate(step.sampled):
            if seq.request_id == "bad" and seq.completion_tokens > 0:  # past its prefill
                logits = logits.clone()
                logits[int(step.sample_rows[i]), 3] = float("nan")
        return logits

    monkeypatch.setattr(engine, "_forward", forward)
    admit = {0: [request(rid, p, max_tokens=12) for rid, p in prompts.items()]}
    outputs = run(engine, admit)
    bad = outputs["bad"][-1]
    assert bad.finished and bad.finish_reason == "error"
    assert isinstance(bad.error, InternalError) and "cannot be sampled" in bad.error.message
    assert bad.completion_tokens == 1  # the token from its prefill; none from the NaN pass
    for rid in ("a", "c"):
        assert token_ids(outputs[rid]) == greedy_reference(reference, prompts[rid], 12)
    assert not engine.has_work()


def test_too_long_prompt_is_an_error_output_not_an_exception(
    tiny_model_dir: Path, reference: tuple[Any, Any]
) -> None:
    _, tokenizer = reference
    engine = TorchEngine(tiny_model_dir, device="cpu", max_model_len=16)
    long_prompt = "The river town woke slowly on the first cold morning of autumn and more"
    fits = tokenizer.decode(tokenizer(long_prompt).input_ids[1:15])  # 14 tokens + BOS = 15
    assert len(tokenizer(long_prompt).input_ids) > 15 and len(tokenizer(fits).input_ids) == 15

    outs = engine.step([request("long", long_prompt), request("fits", fits, max_tokens=10)], [])
    refused, generated = outs
    assert refused.request_id == "long" and refused.finished and refused.finish_reason == "error"
    assert isinstance(refused.error, InvalidRequest) and refused.error.field == "prompt"
    assert refused.token_ids == () and refused.completion_tokens == 0
    # 15 prompt tokens + 1 generated reach max_model_len: a single token, cut for "length".
    assert generated.request_id == "fits" and generated.finish_reason == "length"
    assert generated.completion_tokens == 1 and not engine.has_work()


def test_max_model_len_ends_a_long_generation(tiny_model_dir: Path) -> None:
    engine = TorchEngine(tiny_model_dir, device="cpu", max_model_len=12)
    outs = run(engine, {0: [request("r", "Hi", max_tokens=100)]})["r"]
    assert outs[-1].finish_reason == "length"
    assert outs[-1].prompt_tokens + outs[-1].completion_tokens == 12


def test_duplicate_request_id_is_refused(engine: TorchEngine) -> None:
    engine.step([request("r", "Hi", max_tokens=10)], [])
    (out,) = [o for o in engine.step([request("r", "again")], []) if o.error is not None]
    assert isinstance(out.error, InvalidRequest) and out.error.field == "request_id"
    assert engine.num_running() == 1


def test_empty_prompt_is_bos_only_and_bos_is_not_doubled(
    engine: TorchEngine, reference: tuple[Any, Any]
) -> None:
    _, tokenizer = reference
    outs = engine.step([request("empty", "", max_tokens=1), request("bos", "<s>Hi")], [])
    assert [o.prompt_tokens for o in outs] == [1, len(tokenizer("Hi").input_ids)]


def test_null_engine_finishes_everything_at_once() -> None:
    engine = load_engine("null", max_batch_size=8)
    assert isinstance(engine, NullEngine) and engine.model_name == "null"
    assert engine.adapters is None  # serves no adapters: the executor builds no tiers
    outs = engine.step([request("a", "héllo"), request("b", "x", max_tokens=1)], ["zzz"])
    assert [o.request_id for o in outs] == ["a", "b"]
    assert all(o.finished and o.completion_tokens == 1 and o.error is None for o in outs)
    assert [o.finish_reason for o in outs] == ["stop", "length"]
    assert outs[0].prompt_tokens == len("héllo".encode())
    assert not engine.has_work() and engine.num_running() == engine.num_waiting() == 0


def test_load_engine_builds_a_torch_engine(tiny_model_dir: Path) -> None:
    engine = load_engine(str(tiny_model_dir), device="cpu", max_batch_size=3)
    assert isinstance(engine, TorchEngine)
    assert (engine.model_name, engine.device, engine.max_batch_size) == ("tiny-llama", "cpu", 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_matches_generate(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval().to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = TorchEngine(tiny_model_dir, device="cuda", dtype="float32", max_batch_size=4)
    assert engine.device.startswith("cuda")
    admit: dict[int, list[GenerationRequest]] = defaultdict(list)
    for i, (prompt, n, at) in enumerate(zip(PROMPTS, MAX_TOKENS, ADMIT_AT_STEP, strict=True)):
        admit[at].append(request(f"r{i}", prompt, max_tokens=n))
    outputs = run(engine, admit)
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True)):
        input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to("cuda")
        with torch.inference_mode():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=n,
            )
        assert token_ids(outputs[f"r{i}"]) == out[0, input_ids.shape[1] :].tolist(), f"r{i}"
