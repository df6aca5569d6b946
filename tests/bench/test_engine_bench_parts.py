"""The engine benchmark's pieces: the trace sample, exact-length prompts, the statistics, the
driver, and the baseline engine against plain transformers (greedy, token for token)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vajra.bench.bandwidth import copy_bandwidth, decode_floor_s
from vajra.bench.baseline_engine import load_baseline_engine
from vajra.bench.engine_driver import drive, intervals, kv_summary, percentile, summarize
from vajra.bench.engine_trace import (
    BenchRequest,
    PromptMaker,
    TraceShape,
    read_trace,
    trace_requests,
)


def test_the_trace_sample_is_both_services_merged_in_time() -> None:
    rows = read_trace()
    assert len(rows) == 640
    assert {r.service for r in rows} == {"code", "conv"}
    assert [r.offset_s for r in rows] == sorted(r.offset_s for r in rows)
    assert rows[0].offset_s == 0.0 and rows[0].context_tokens == 4808  # the code file's first


def test_percentile_and_intervals() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)
    # a step that gave two tokens at once counts two gaps of half its interval
    assert intervals([0.0, 1.0, 3.0, 3.0]) == [1.0, 1.0, 1.0]
    assert intervals([5.0]) == []


def test_kv_summary_counts_live_tokens_against_allocated_bytes() -> None:
    samples = [
        {"allocated_bytes": 1000, "live_tokens": 5, "used_blocks": 2, "total_blocks": 4},
        {"allocated_bytes": 1000, "live_tokens": 10, "used_blocks": 4, "total_blocks": 4},
    ]
    kv = kv_summary(samples, bytes_per_token=50)
    assert kv is not None
    assert kv["peak"] == {
        "allocated_bytes": 1000,
        "live_tokens": 10,
        "used_blocks": 4,
        "total_blocks": 4,
    }
    assert kv["live_fraction_mean"] == pytest.approx((0.25 + 0.5) / 2)
    assert kv["live_fraction_of_used_mean"] == pytest.approx((0.5 + 0.5) / 2)
    assert kv_summary([], 50) is None


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> PromptMaker:
    return PromptMaker(AutoTokenizer.from_pretrained(tiny_model_dir), seed=1)


@pytest.mark.parametrize("tokens", [2, 3, 17, 500, 1500])
def test_prompts_encode_to_exactly_their_length(prompts: PromptMaker, tokens: int) -> None:
    assert prompts.count(prompts.prompt(tokens)) == tokens
    system = prompts.text(99)
    shared = prompts.prompt(tokens + 100, prefix=system)
    assert shared.startswith(system) and prompts.count(shared) == tokens + 100


def test_trace_requests_cap_lengths_and_speed_up_arrivals(prompts: PromptMaker) -> None:
    rows = read_trace()
    shape = TraceShape(max_prompt_tokens=64, max_output_tokens=8, rate_scale=10.0)
    requests = trace_requests(rows, 700, shape, prompts, adapter_slots=[3, 4])
    assert len({r.request_id for r in requests}) == 700  # the sample cycles past 640
    assert all(2 <= r.prompt_tokens <= 64 and 1 <= r.max_tokens <= 8 for r in requests)
    assert requests[0].arrival_s == 0.0
    assert requests[639].arrival_s == pytest.approx(rows[639].offset_s / 10.0)
    assert requests[640].arrival_s > requests[639].arrival_s
    assert [r.adapter_slot for r in requests[:3]] == [3, 4, 3]
    assert all(r.arrival_s == 0.0 for r in trace_requests(rows, 5, shape, prompts, arrivals=False))


def test_baseline_engine_matches_generate_and_the_driver_counts_its_tokens(
    tiny_model_dir: Path, prompts: PromptMaker
) -> None:
    """Greedy tokens equal ``model.generate`` run one prompt at a time; the driver admits no
    more than ``concurrency`` at once and every token is counted."""
    engine = load_baseline_engine(tiny_model_dir, device="cpu", dtype="float32", max_batch_size=4)
    requests = [
        BenchRequest(f"q{i}", prompts.prompt(n), n, m, arrival_s=0.0)
        for i, (n, m) in enumerate([(5, 6), (40, 3), (12, 9), (70, 5), (8, 4)])
    ]
    tokens: dict[str, list[int]] = {}
    peak = 0

    def on_step(_: float, outputs: list) -> None:  # type: ignore[type-arg]
        nonlocal peak
        peak = max(peak, engine.num_running() + engine.num_waiting())
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.token_ids)

    run = drive(engine, requests, concurrency=2, on_step=on_step)
    summary = summarize(run)
    assert summary["errors"] == 0 and summary["finished"] == 5
    assert summary["output_tokens"] == sum(r.max_tokens for r in requests)
    assert peak <= 2

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for r in requests:
        ids = tokenizer(r.prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, do_sample=False, max_new_tokens=r.max_tokens)
        expected = out[0, ids.shape[1] :].tolist()
        assert tokens[r.request_id] == expected, r.request_id
    stats = engine.kv_stats()
    assert stats["allocated_bytes"] == 0 and stats["live_tokens"] == 0  # nothing left running


def test_decode_floor_is_weights_plus_every_rows_kv_over_bandwidth() -> None:
    floor = decode_floor_s(
        weight_bytes=2_000, kv_bytes_per_token=10, rows=4, context=50, bandwidth=1_000.0
    )
    assert floor == pytest.approx((2_000 + 4 * 50 * 10) / 1_000)
    # A copy moves bytes read plus bytes written; any machine moves more than 10 MB/s.
    assert copy_bandwidth("cpu", nbytes=1 << 20, repeats=3) > 1e7
