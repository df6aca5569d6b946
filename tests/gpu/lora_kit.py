"""Small LoRA layouts, adapters packed through ``pack_adapter``, and a per-token reference.

Every expected value here is recomputed from the adapters' own ``A``, ``B`` and scale, one
token at a time in float64, never from the pool: the pool, the packing and both compute paths
are what the tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vajra.adapters import AdapterManifest, BaseModelSpec
from vajra.gpu.lora import HostAdapter, LoraBatchState, LoraLayout, LoraPool, pack_adapter

HIDDEN, KV, INTER = 16, 8, 24
SPEC = BaseModelSpec(
    model_type="llama",
    modules={
        name: shape
        for layer in range(2)
        for name, shape in (
            (f"model.layers.{layer}.self_attn.q_proj", (HIDDEN, HIDDEN)),
            (f"model.layers.{layer}.self_attn.k_proj", (HIDDEN, KV)),
            (f"model.layers.{layer}.self_attn.v_proj", (HIDDEN, KV)),
            (f"model.layers.{layer}.self_attn.o_proj", (HIDDEN, HIDDEN)),
            (f"model.layers.{layer}.mlp.down_proj", (INTER, HIDDEN)),
            (f"model.layers.{layer}.mlp.other", (HIDDEN, HIDDEN)),  # not targeted
        )
    }
    | {"lm_head": (HIDDEN, 30)},
)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
LAYOUT = LoraLayout.from_spec(SPEC, TARGETS)


def manifest(
    ranks: dict[str, int], alphas: dict[str, float], *, rslora: bool = False
) -> AdapterManifest:
    return AdapterManifest(
        rank=max(ranks.values()),
        ranks=ranks,
        lora_alpha=1.0,
        alphas=alphas,
        target_modules=(),
        modules=tuple(sorted(ranks)),
        use_rslora=rslora,
        dtype="F32",
        size_bytes=0,
        digest="x",
        tensors={m: (f"{m}.A", f"{m}.B") for m in ranks},
    )


@dataclass(frozen=True)
class Adapter:
    """An adapter as the tests know it: its packed form and, per module, ``A`` and ``Bt``."""

    host: HostAdapter
    a: dict[str, torch.Tensor]  # module -> [r, in]
    bt: dict[str, torch.Tensor]  # module -> [r, out], scale folded in


def make_adapter(
    ranks: dict[str, int],
    seed: int,
    *,
    layers: tuple[int, ...] = (0, 1),
    layout: LoraLayout = LAYOUT,
) -> Adapter:
    """Random A and B on every module of the kinds in ``ranks`` (kind -> rank) of ``layers``,
    packed by ``pack_adapter``; values of order one after scaling."""
    gen = torch.Generator().manual_seed(seed)
    module_ranks = {
        m: ranks[kind]
        for m in layout.modules
        if (kind := m.rsplit(".", 1)[-1]) in ranks and int(m.split(".")[2]) in layers
    }
    alphas = {m: 2.0 * r for m, r in module_ranks.items()}
    info = manifest(module_ranks, alphas)
    tensors: dict[str, torch.Tensor] = {}
    a: dict[str, torch.Tensor] = {}
    bt: dict[str, torch.Tensor] = {}
    for m, r in module_ranks.items():
        in_f, out_f = SPEC.modules[m]
        tensors[f"{m}.A"] = torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)
        tensors[f"{m}.B"] = torch.randn(out_f, r, generator=gen) / math.sqrt(r)
        a[m] = tensors[f"{m}.A"]
        bt[m] = tensors[f"{m}.B"].t() * info.scale(m)
    return Adapter(pack_adapter(info, tensors, layout, pin=False), a, bt)


def token_slots(segments: list[tuple[int, int, int | None]], num_tokens: int) -> list[int | None]:
    slots: list[int | None] = [None] * num_tokens
    for start, length, slot in segments:
        slots[start : start + length] = [slot] * length
    return slots


def reference_delta(
    x: torch.Tensor,  # [T, in]
    slots: list[int | None],
    adapters: dict[int, Adapter],  # slot -> adapter
    module: str,
) -> torch.Tensor:
    """``(x[t] @ A^T) @ Bt`` of each token's adapter for ``module``, token by token, float64."""
    out_f = SPEC.modules[module][1]
    want = torch.zeros(x.shape[0], out_f, dtype=torch.float64)
    for t, slot in enumerate(slots):
        if slot is None or module not in adapters[slot].a:
            continue
        adapter = adapters[slot]
        want[t] = (x[t].double() @ adapter.a[module].double().t()) @ adapter.bt[module].double()
    return want


def mixed_pool(
    max_vram_adapters: int = 4, mean_rank: int = 48
) -> tuple[LoraPool, dict[str, int], dict[int, Adapter]]:
    """Three adapters of ranks 4, 16 and 64 on different modules (one with a per-module
    rank and one on layer 1 only), in a pool; their slots by name, and the adapters."""
    pool = LoraPool(LAYOUT, max_vram_adapters=max_vram_adapters, max_rank=64, mean_rank=mean_rank)
    specs = {
        "r4-qv": ({"q_proj": 4, "v_proj": 4}, (0, 1)),
        "r16-kod": ({"k_proj": 16, "o_proj": 16, "down_proj": 8}, (0, 1)),
        "r64-all-layer1": ({kind: 64 for kind in TARGETS}, (1,)),
    }
    slots, adapters = {}, {}
    for seed, (name, (ranks, layers)) in enumerate(specs.items(), start=1):
        adapter = make_adapter(ranks, seed, layers=layers)
        slots[name] = pool.load(adapter.host)
        adapters[slots[name]] = adapter
    return pool, slots, adapters


def packed_batch(slots: dict[str, int]) -> tuple[list[tuple[int, int, int | None]], int]:
    """Base tokens, decode tokens of all three adapters, two prefill segments, an uncovered
    token and a base prefill: one step's packed forward."""
    a, b, c = slots["r4-qv"], slots["r16-kod"], slots["r64-all-layer1"]
    segments: list[tuple[int, int, int | None]] = [
        (0, 1, a),
        (1, 1, None),
        (2, 1, b),
        (3, 1, c),
        (4, 1, a),
        (5, 1, c),
        (6, 1, b),
        # token 7: in no segment
        (8, 21, b),  # a prefill chunk
        (29, 40, c),  # another, longer than one Triton block
        (69, 6, None),  # a base prefill
    ]
    return segments, 75


def packed_deltas(
    state: LoraBatchState, names: dict[str, int], *, columns: bool = False
) -> dict[str, torch.Tensor]:
    """The state's LoRA deltas on :func:`packed_batch` for every module of the layout
    (float64 on the CPU), on fixed random inputs. With ``columns`` each module's output is
    its columns of a wider merged projection (rows strided, as the fused forwards pass it):
    the deltas are added there in place and the other columns stay untouched."""
    segments, num_tokens = packed_batch(names)
    gen = torch.Generator().manual_seed(0)
    out = {}
    state.set_segments(segments, num_tokens)
    try:
        for index, module in enumerate(LAYOUT.modules):
            in_f, out_f = SPEC.modules[module]
            x = torch.randn(1, num_tokens, in_f, generator=gen)
            x = x.to(state.pool.device, state.pool.dtype)
            wide = torch.full((1, num_tokens, out_f + 7), 0.5, device=x.device, dtype=x.dtype)
            y = wide[..., 3 : 3 + out_f] if columns else wide[..., :out_f].contiguous()
            got = state.apply(index, x, y)
            if columns:
                assert got.data_ptr() == y.data_ptr(), module  # in place, no copy
                rest = torch.cat((wide[..., :3], wide[..., 3 + out_f :]), dim=-1)
                assert bool((rest == 0.5).all()), module
            out[module] = got[0].cpu().double() - 0.5
    finally:
        state.clear()
    return out


def check_packed_batch(
    state: LoraBatchState,
    names: dict[str, int],
    adapters: dict[int, Adapter],
    tol: float,
    *,
    columns: bool = False,
) -> dict[str, torch.Tensor]:
    """:func:`packed_deltas` equal the per-token reference within ``tol``; returns them."""
    segments, num_tokens = packed_batch(names)
    slots = token_slots(segments, num_tokens)
    got = packed_deltas(state, names, columns=columns)
    gen = torch.Generator().manual_seed(0)
    for module, delta in got.items():
        x = torch.randn(num_tokens, SPEC.modules[module][0], generator=gen)
        error = (delta - reference_delta(x, slots, adapters, module)).abs().max().item()
        assert error <= tol, (module, error)
    return got


def triton_interpreter_check() -> None:
    """Run in a process started with ``TRITON_INTERPRET=1``: the Triton backend on CPU
    tensors against the per-token reference (and the torch backend on the same batch), with
    decode tokens through BGMV and prefill chunks through SGMV ("auto"), and every segment,
    length-1 ones included, through SGMV ("segmented"). The all-BGMV mode is left out: the
    interpreter runs it one token at a time, slowly. Each also into the modules' columns of
    merged projections (strided rows), equal to the contiguous outputs."""
    pool, names, adapters = mixed_pool()
    for mode in ("auto", "segmented"):
        got = {}
        for backend in ("triton", "torch"):
            state = LoraBatchState(pool, mode=mode, backend=backend)  # type: ignore[arg-type]
            got[backend] = check_packed_batch(state, names, adapters, tol=1e-5)
            # the same deltas into each module's columns of a merged projection
            columns = check_packed_batch(state, names, adapters, tol=1e-5, columns=True)
            assert all(torch.equal(columns[m], got[backend][m]) for m in columns), backend
            segments, num_tokens = packed_batch(names)
            state.set_segments(segments, num_tokens)  # and in groups of modules
            group_check(state, token_slots(segments, num_tokens), adapters, tol=1e-5)
            state.clear()
        for module, delta in got["triton"].items():
            assert (delta - got["torch"][module]).abs().max().item() <= 1e-5, (mode, module)
    static_check(pool, adapters)
    print("triton interpreter: ok")


def static_check(pool: LoraPool, adapters: dict[int, Adapter]) -> None:
    """The static (graph) form on the Triton backend: decode tokens whose slots are device
    data, base tokens on the pool's null slot, equal the per-token reference."""
    slots: list[int | None] = [*adapters, None, *reversed(adapters), None]
    n = len(slots)
    tokens = torch.arange(n, dtype=torch.int32, device=pool.device)
    device_slots = torch.tensor(
        [pool.null_slot if s is None else s for s in slots], dtype=torch.int32, device=pool.device
    )
    state = LoraBatchState(pool, backend="triton")
    state.set_static(tokens, device_slots)
    gen = torch.Generator().manual_seed(5)
    try:
        for index, module in enumerate(LAYOUT.modules):
            in_f, out_f = SPEC.modules[module]
            x = torch.randn(n, in_f, generator=gen)
            y = torch.zeros(n, out_f, dtype=pool.dtype, device=pool.device)
            got = state.apply(index, x.to(pool.device, pool.dtype), y).cpu().double()
            error = (got - reference_delta(x, slots, adapters, module)).abs().max().item()
            assert error <= 1e-5, (module, error)
        group_check(state, slots, adapters, tol=1e-5)
    finally:
        state.clear()


def group_check(
    state: LoraBatchState, slots: list[int | None], adapters: dict[int, Adapter], tol: float
) -> None:
    """With the state set for a forward of ``len(slots)`` tokens: each layer's attention
    modules, which all read the hidden state, as one group (three, then one, on the Triton
    path) into their columns of one merged output: written in place, equal to the per-token
    reference, the columns around untouched."""
    pool, n = state.pool, len(slots)
    gen = torch.Generator().manual_seed(9)
    for layer in range(2):
        names = [f"model.layers.{layer}.self_attn.{m}" for m in ("q_proj", "k_proj", "v_proj")]
        names.append(f"model.layers.{layer}.self_attn.o_proj")
        widths = [SPEC.modules[name][1] for name in names]
        x = torch.randn(n, HIDDEN, generator=gen)
        merged = torch.zeros(n, sum(widths) + 2, dtype=pool.dtype, device=pool.device)
        parts = list(torch.split(merged[:, 1 : 1 + sum(widths)], widths, dim=-1))
        indices = [LAYOUT.modules.index(name) for name in names]
        got = state.apply_group(indices, x.to(pool.device, pool.dtype), parts)
        for name, delta, part in zip(names, got, parts, strict=True):
            assert delta.data_ptr() == part.data_ptr(), name  # in place
            want = reference_delta(x, slots, adapters, name)
            error = (delta.cpu().double() - want).abs().max().item()
            assert error <= tol, (name, error)
        assert not merged[:, 0].any() and not merged[:, -1].any()


if __name__ == "__main__":
    triton_interpreter_check()
