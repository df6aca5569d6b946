"""Decode steps through the static buffers of vajra.gpu.decode_graphs (tiny model, CPU, float32).

On the CPU the static path runs uncaptured (``decode_graphs="eager"``): every decode-only step
goes through the padded buckets, the scratch KV block and the static buffers, and must give
exactly what the engine without it gives, with base and adapter rows, preemption and prompt
logprobs in the mix. On CUDA the captured graphs are checked against the eager engine.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.gpu.peft_adapters import ADAPTERS
from tests.gpu.test_paged_engine import prompt_of
from vajra.adapters.format import base_model_spec
from vajra.gpu.decode_graphs import can_capture, graph_buckets
from vajra.gpu.engine import TorchEngine
from vajra.gpu.interface import GenerationRequest, StepOutput
from vajra.gpu.lora import LoraBatchState, LoraPool, pack_adapter_dir
from vajra.policies.decoding import SamplingParams


def test_buckets_cover_every_batch_size_with_at_most_half_again_of_padding_above_16() -> None:
    assert graph_buckets(1) == [1]
    assert graph_buckets(5) == [1, 2, 4, 5]
    assert graph_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_buckets(128) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
    assert graph_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    for rows in (1, 3, 17, 33, 100, 257):
        buckets = graph_buckets(rows)
        assert buckets == sorted(set(buckets)) and buckets[-1] == rows
        for d in range(1, rows + 1):
            b = next(b for b in buckets if b >= d)
            assert b <= max(2 * d - 1, 16) if d <= 16 else b <= 1.5 * d


def engine_of(model_dir: Path, mode: str, **kw: Any) -> TorchEngine:
    kw = {"device": "cpu", "max_batch_size": 8, "max_batch_tokens": 64, **kw}
    return TorchEngine(model_dir, decode_graphs=mode, **kw)  # type: ignore[arg-type]


def load_adapters(engine: TorchEngine, adapter_dirs: dict[str, Path], model: Path) -> list[int]:
    residency = engine.adapters
    assert residency is not None
    spec = base_model_spec(model)
    return [
        residency.load(pack_adapter_dir(adapter_dirs[name], spec, residency.layout))
        for name in ADAPTERS
    ]


def drive(engine: TorchEngine, admit: dict[int, list[GenerationRequest]]) -> dict[str, Any]:
    """Step until done; each request's tokens, logprobs and finish reason."""
    got: dict[str, Any] = defaultdict(lambda: {"tokens": [], "logprobs": [], "reason": None})
    step = 0
    while step <= max(admit, default=0) or engine.has_work():
        out: StepOutput
        for out in engine.step(admit.get(step, []), []):
            assert out.error is None, out.error
            got[out.request_id]["tokens"] += out.token_ids
            got[out.request_id]["logprobs"] += [lp.logprob for lp in out.logprobs]
            got[out.request_id]["reason"] = out.finish_reason
        step += 1
        assert step < 5000
    return dict(got)


def mixed_requests(tokenizer: Any, slots: list[int]) -> dict[int, list[GenerationRequest]]:
    """Base and adapter rows of mixed lengths arriving at random steps (so decode batches of
    every size from 1 to 8 pad to their buckets), some with logprobs or prompt logprobs."""
    rng = random.Random(11)
    admit: dict[int, list[GenerationRequest]] = defaultdict(list)
    for i in range(14):
        slot = None if i % 3 == 0 else slots[i % len(slots)]
        prompt = prompt_of(tokenizer, rng.choice([3, 20, 70, 150]), seed=300 + i)
        params = SamplingParams(
            max_tokens=rng.choice([2, 9, 17]),
            logprobs=2 if i % 4 == 1 else None,
            prompt_logprobs=1 if i == 5 else None,
        )
        admit[rng.randrange(0, 40)].append(GenerationRequest(f"g{i}", prompt, params, slot))
    return admit


def test_the_static_path_changes_no_token_or_logprob(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    plain = engine_of(tiny_model_dir, "off", max_adapters=6)
    static = engine_of(tiny_model_dir, "eager", max_adapters=6)
    assert plain.decode_graphs is None and static.decode_graphs is not None
    slots = load_adapters(plain, adapter_dirs, tiny_model_dir)
    assert load_adapters(static, adapter_dirs, tiny_model_dir) == slots
    admit = mixed_requests(static.tokenizer, slots)
    want = drive(plain, admit)
    got = drive(static, admit)
    assert got.keys() == want.keys()
    for rid, result in want.items():
        assert got[rid]["tokens"] == result["tokens"], rid
        assert got[rid]["reason"] == result["reason"], rid
        assert got[rid]["logprobs"] == pytest.approx(result["logprobs"], abs=1e-4), rid
    stats = static.decode_graphs.stats
    assert stats.eager > 20 and stats.replays == 0 and stats.captured == 0


def test_preemption_and_recomputation_under_the_static_path_change_nothing(
    tiny_model_dir: Path,
) -> None:
    """16 requests of 200 tokens (40 out) against 54 blocks of 16: four fit, then outgrow the
    cache, and the newest are preempted and recomputed (eagerly: those steps are not decode
    only) while the rest decode through the static path; every output equals an
    unconstrained plain engine's."""
    kw: dict[str, Any] = {"max_batch_size": 16, "max_model_len": 256, "max_batch_tokens": 256}
    roomy = engine_of(tiny_model_dir, "off", **kw)
    per_block = roomy.kv.nbytes // roomy.kv.num_blocks
    tight = engine_of(tiny_model_dir, "eager", kv_cache_bytes=54 * per_block, **kw)
    prompts = [prompt_of(tight.tokenizer, 200, seed=500 + i) for i in range(16)]
    admit = {
        0: [
            GenerationRequest(f"p{i}", p, SamplingParams(max_tokens=40))
            for i, p in enumerate(prompts)
        ]
    }
    want, got = drive(roomy, admit), drive(tight, admit)
    assert tight.kv_stats()["preemptions"] > 0
    assert tight.decode_graphs is not None and tight.decode_graphs.stats.eager > 20
    for rid, result in want.items():
        assert got[rid]["tokens"] == result["tokens"], rid


def test_padding_rows_write_the_scratch_block_and_change_nothing(tiny_model_dir: Path) -> None:
    """Three rows run in bucket 4: the padding row's key and value land in the block past the
    planner's last (which no request is ever given), and the rows' tokens are the plain
    engine's."""
    plain, engine = engine_of(tiny_model_dir, "off"), engine_of(tiny_model_dir, "eager")
    scratch = engine.kv.num_blocks - 1
    assert engine._planner.blocks.num_blocks == scratch
    prompts = ["a b c", "one two three four five six", "x"]
    admit = {
        0: [
            GenerationRequest(f"s{i}", p, SamplingParams(max_tokens=6))
            for i, p in enumerate(prompts)
        ]
    }
    engine.kv.k[0][scratch].fill_(7.0)  # a request reading it would change its tokens
    got, want = drive(engine, admit), drive(plain, admit)
    assert got == want and all(len(r["tokens"]) == 6 for r in got.values())
    assert engine.decode_graphs is not None and engine.decode_graphs.stats.eager >= 5
    assert (engine.kv.k[0][scratch, 0] != 7.0).all()  # the padding row wrote position 0
    assert (engine.kv.k[0][scratch, 1:] == 7.0).all()


def test_a_step_whose_adapter_was_freed_fails_its_rows_and_the_engine_goes_on(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    engine = engine_of(tiny_model_dir, "eager", max_adapters=6)
    slots = load_adapters(engine, adapter_dirs, tiny_model_dir)
    first = [
        GenerationRequest("a", "one two", SamplingParams(max_tokens=30), slots[0]),
        GenerationRequest("b", "three four", SamplingParams(max_tokens=30)),
    ]
    outs = engine.step(first, []) + engine.step([], [])
    assert not any(o.finished for o in outs)
    assert engine.adapters is not None
    engine.adapters.free(slots[0])
    ended = [o for o in engine.step([], []) if o.finished]
    assert [o.request_id for o in ended] == ["a", "b"]  # as without graphs: the whole step
    assert all(o.finish_reason == "error" for o in ended)
    later = drive(engine, {0: [GenerationRequest("c", "five", SamplingParams(max_tokens=4))]})
    assert len(later["c"]["tokens"]) == 4


#: aten ops that make the host wait for the device (a value read back, or an output whose size
#: depends on the data): any of them in a captured forward fails the capture.
HOST_WAITS = {
    "_local_scalar_dense",  # .item(), bool(t), int(t)
    "nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "unique_consecutive",
    "repeat_interleave",
    "bincount",
    "equal",
    "is_nonzero",
}


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_forward_a_graph_captures_never_waits_for_the_device(tiny_model_dir: Path) -> None:
    """What the capture records is the static forward (transformers' model with paged
    attention): every aten op it calls on the CPU, recorded, includes none that reads a value
    back to the host. (The CUDA kernels that replace the CPU's attention and LoRA paths are
    Triton launches on device data.)"""
    engine = engine_of(tiny_model_dir, "eager")
    graphs = engine.decode_graphs
    assert graphs is not None
    with torch.inference_mode():
        graphs._fill([], 8)
        with OpRecorder() as recorder:
            graphs._forward(8, False, 1, None)
    assert {"embedding", "linear", "index_copy_"} <= recorder.ops  # it saw the forward
    assert not recorder.ops & HOST_WAITS, recorder.ops & HOST_WAITS
    with OpRecorder() as control:  # and it would see a wait
        assert bool(torch.ones(1) > 0)
    assert "_local_scalar_dense" in control.ops


def test_steps_with_the_model_skipped_run_one_forward_and_leave_the_engine_as_it_was(
    tiny_model_dir: Path,
) -> None:
    """``model_skipped`` (what (b)'s ``outside_model_ms`` times): inside, four decode steps run
    the model once and reuse its logits (so each row repeats its token); outside again, every
    step runs the model and counts, and a row that joins takes its own tokens."""
    engine = engine_of(tiny_model_dir, "eager")
    graphs = engine.decode_graphs
    assert graphs is not None
    forwards: list[int] = []
    engine.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompts = ["a b c", "one two three four five six", "x y"]
    admit = [GenerationRequest(f"k{i}", p, params) for i, p in enumerate(prompts)]
    while not all(engine.step(admit, [])[i].token_ids for i in range(3)):
        admit = []
    engine.step([], [])
    eager, before = graphs.stats.eager, len(forwards)
    with graphs.model_skipped():
        inside = [engine.step([], []) for _ in range(4)]
    assert len(forwards) == before + 1 and graphs.stats.eager == eager
    for i in range(3):
        assert len({step[i].token_ids for step in inside[1:]}) == 1  # the same logits each time
    after = [engine.step([], []) for _ in range(3)]
    assert len(forwards) == before + 4 and graphs.stats.eager == eager + 3
    assert all(len(step) == 3 for step in after)
    plain = engine_of(tiny_model_dir, "off")
    late = GenerationRequest("late", "the late one", SamplingParams(max_tokens=5))
    assert drive(engine, {0: [late]})["late"] == drive(plain, {0: [late]})["late"]


def test_graphs_are_never_captured_on_the_cpu_and_a_bad_mode_is_refused(
    tiny_model_dir: Path,
) -> None:
    assert not can_capture(torch.device("cpu"), None)
    assert engine_of(tiny_model_dir, "auto").decode_graphs is None
    with pytest.raises(ValueError, match="decode_graphs"):
        engine_of(tiny_model_dir, "sometimes")


def test_an_engine_whose_capture_fails_serves_eagerly_and_says_why(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capturing on a machine without CUDA fails inside torch.cuda: the engine must start
    anyway, without graphs, and keep the reason."""
    monkeypatch.setattr("vajra.gpu.decode_graphs.can_capture", lambda device, lora: True)
    engine = engine_of(tiny_model_dir, "auto")
    assert engine.decode_graphs is None
    assert engine.decode_graphs_error
    got = drive(engine, {0: [GenerationRequest("a", "one two", SamplingParams(max_tokens=3))]})
    assert len(got["a"]["tokens"]) == 3


def test_the_static_lora_form_needs_the_triton_backend(tiny_model_dir: Path) -> None:
    engine = engine_of(tiny_model_dir, "off", max_adapters=2)
    assert engine.lora_state is not None
    pool: LoraPool = engine.lora_state.pool
    state = LoraBatchState(pool, backend="torch")
    index = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="triton"):
        state.set_static(index, index)
    assert pool.rank_table[pool.null_slot].tolist() == [0] * len(pool.layout.kinds)
    assert not pool.is_loaded(pool.null_slot)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graphs_give_the_eager_engines_tokens_on_cuda(
    tiny_model_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    pytest.importorskip("triton")
    kw = {"device": "cuda", "dtype": "float32", "max_adapters": 6}
    plain = engine_of(tiny_model_dir, "off", **kw)
    graphed = engine_of(tiny_model_dir, "auto", **kw)
    assert graphed.decode_graphs is not None
    assert graphed.decode_graphs.stats.captured == 2 * len(graphed.decode_graphs.buckets)
    slots = load_adapters(plain, adapter_dirs, tiny_model_dir)
    assert load_adapters(graphed, adapter_dirs, tiny_model_dir) == slots
    admit = mixed_requests(graphed.tokenizer, slots)
    want, got = drive(plain, admit), drive(graphed, admit)
    for rid, result in want.items():
        assert got[rid]["tokens"] == result["tokens"], rid
    assert graphed.decode_graphs.stats.replays > 20
