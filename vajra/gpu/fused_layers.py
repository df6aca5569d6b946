# mypy: disable-error-code="no-untyped-def, untyped-decorator, misc"
# (the @triton.jit kernels below take untyped pointers and scalars; the launchers are typed)
"""One Triton kernel each for the RMS norms, the rotary embedding and the gated MLP
activation of Llama-family models, in place of transformers' chains of small ops.

Why: a decode step of a small model on a GPU is bound by how many kernels it launches, not
by their arithmetic. On an H200 the Llama-3.2-1B-shaped step at 32 rows and 128 tokens of
context took 3.46 ms from a CUDA graph against a memory-bandwidth floor of 0.51 ms
(docs/benchmarks.md, "The resized `make gpu-check` on an H200"). transformers' RMS norm is
eight kernels (to float32, square, mean, add epsilon, reciprocal square root, scale, back to
the input dtype, times the weight), run twice per layer and once at the end; its rotary
embedding is ten per layer (for queries and keys each: two products, a negation, a
concatenation, a third product and a sum); its MLP runs the activation and the product as two.
Here each is one kernel: 24 fewer launches per layer, 391 fewer per step on the 1B shape's 16
layers.

Semantics, the same as transformers' forwards, rounding included: the norm reduces in
float32, rounds the normalised row to the input dtype, then multiplies by the weight in the
dtype torch's promotion gives (the product of two bfloat16 numbers is exact in float32, so
rounding it once matches torch's bfloat16 multiply); the rotary embedding rounds each product
and the sum (``x * cos + rotate_half(x) * sin``); the activation is ``silu(gate)`` rounded to
the input dtype, times ``up``, rounded. The sum of squares runs in another order than
torch's ``mean``, so a float32 result may differ in the last bits.

Where: :func:`install` swaps the ``forward`` of the model's ``LlamaRMSNorm``,
``MistralRMSNorm``, ``Qwen2RMSNorm``, the attention and the MLP modules of the same three
families (their forwards are the code above, checked on transformers 5.17; the attention
forward is theirs with the rotary step replaced, given no cache object), the MLPs only with
the SiLU activation. The fused forward runs only when no gradient is wanted and the input is on a CUDA
device (or on the CPU under Triton's interpreter, for the tests); otherwise, as in training
(:mod:`vajra.gpu.training`, which shares the model), the module's own forward runs. The
kernels read only shapes on the host, so a CUDA graph captures them
(:mod:`vajra.gpu.decode_graphs`).

Tested in Triton's interpreter on CPU tensors against the transformers modules
(``tests/gpu/test_fused_layers.py``); the CUDA test compares them on the device.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError:  # the modules keep their own forwards
    _HAVE_TRITON = False
else:
    _HAVE_TRITON = True

log = logging.getLogger(__name__)

#: transformers' classes whose forwards the fused ones replace (module, class name).
NORM_CLASSES = (
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
)
MLP_CLASSES = (
    ("transformers.models.llama.modeling_llama", "LlamaMLP"),
    ("transformers.models.mistral.modeling_mistral", "MistralMLP"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2MLP"),
)
#: transformers' attention classes whose rotary embedding becomes one kernel, with what each
#: passes its attention function as ``sliding_window`` (none, its own, its config's).
ATTENTION_CLASSES = (
    ("transformers.models.llama.modeling_llama", "LlamaAttention", "none"),
    ("transformers.models.mistral.modeling_mistral", "MistralAttention", "config"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention", "module"),
)
#: Elements one program of the activation kernel handles.
ACT_BLOCK = 1024


def available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device``: CUDA with triton importable."""
    return torch.device(device).type == "cuda" and _HAVE_TRITON


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMS norm of ``x`` over its last dimension, in one kernel (see the module
    docstring for the rounding)."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} for rows of {hidden}")
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm[(rows.shape[0],)](
            rows, weight, out, rows.stride(0), out.stride(0), hidden, float(eps),
            BLOCK=block,
            ROUND=_ROUNDING[x.dtype],
            num_warps=min(16, max(1, block // 256)),
        )  # fmt: skip
    return out.view(*x.shape[:-1], hidden)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as transformers' MLP computes it, in one kernel."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {gate.shape} {gate.dtype} and up {up.shape} {up.dtype} differ")
    g, u = gate.contiguous(), up.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    if n:
        _silu_mul[(triton.cdiv(n, ACT_BLOCK),)](
            g, u, out, n, BLOCK=ACT_BLOCK, ROUND=_ROUNDING[g.dtype], num_warps=4
        )
    return out


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` in one kernel for both:
    ``q`` ``[B, heads, T, D]`` and ``k`` ``[B, kv_heads, T, D]`` (any strides, one dtype),
    ``cos`` and ``sin`` ``[B, T, D]``; returns new tensors with the inputs' strides."""
    if q.dtype != k.dtype or q.shape[-1] % 2 or q.shape[0] != k.shape[0]:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype}")
    batch, heads, tokens, dim = q.shape
    if k.shape[2:] != (tokens, dim) or cos.shape != (batch, tokens, dim) or sin.shape != cos.shape:
        raise ValueError(f"k {tuple(k.shape)}, cos {tuple(cos.shape)} for q {tuple(q.shape)}")
    cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos, sin))
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if q.numel() == 0:
        return q_out, k_out
    kv_heads = k.shape[1]
    _rotary[(batch * tokens, heads + kv_heads)](
        q, k, cos, sin, q_out, k_out, tokens, heads,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        HALF=dim // 2,
        HALF_P=triton.next_power_of_2(dim // 2),
        ROUND=_ROUNDING[q.dtype],
        num_warps=1,
    )  # fmt: skip
    return q_out, k_out


def check(device: torch.device | str, dtype: torch.dtype, hidden: int, head_dim: int) -> str | None:
    """Build and run each kernel once at a model's sizes against torch's ops; None when all
    agree, else what failed (a kernel this Triton or device cannot build, or a wrong
    result). The engine installs nothing then and says why, rather than failing every step."""
    why = _check(device, dtype, hidden, head_dim)
    if why is not None:
        log.error("fused layers not installed: %s", why)
    return why


def _check(
    device: torch.device | str, dtype: torch.dtype, hidden: int, head_dim: int
) -> str | None:
    if not _HAVE_TRITON:
        return "triton does not import"
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    try:
        with torch.no_grad():
            x, w = rand(3, hidden), rand(hidden)
            xf = x.float()
            normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
            pairs = [(rms_norm(x, w, 1e-5), w * normed)]
            gate, up = rand(3, 2 * hidden), rand(3, 2 * hidden)
            pairs.append((silu_mul(gate, up), torch.nn.functional.silu(gate) * up))
            q, k, cos, sin = (
                rand(1, 4, 3, head_dim),
                rand(1, 2, 3, head_dim),
                *(rand(1, 3, head_dim) for _ in range(2)),
            )
            got_q, got_k = rotary(q, k, cos, sin)
            for got, inp in ((got_q, q), (got_k, k)):
                half = torch.cat((-inp[..., head_dim // 2 :], inp[..., : head_dim // 2]), -1)
                pairs.append((got, inp * cos[:, None] + half * sin[:, None]))
            for i, (got, want) in enumerate(pairs):
                scale = want.float().abs().max().item() + 1.0
                error = (got.float() - want.float()).abs().max().item() / scale
                if not error <= (1e-4 if dtype == torch.float32 else 2e-2):
                    return f"fused kernel {i} differs from torch by {error:.3g} (relative)"
    except Exception as exc:  # a Triton compilation or launch error
        return f"{type(exc).__name__}: {exc}"
    return None


def install(model: Any) -> int:
    """Give the model's matching norms and MLPs the fused forwards (see the module
    docstring); returns how many modules changed. Does nothing without triton."""
    if not _HAVE_TRITON:
        return 0
    norms, mlps = _classes(NORM_CLASSES), _classes(MLP_CLASSES)
    windows = {c: how for c, how in zip(_classes(ATTENTION_CLASSES), _windows(), strict=True)}
    changed = 0
    fused: Callable[..., Any]
    for module in model.modules():
        if "forward" in vars(module):  # already installed, or someone else's
            continue
        if isinstance(module, norms):
            fused = _fused_norm_forward(type(module).forward)
        elif isinstance(module, mlps) and _is_silu(module):
            fused = _fused_mlp_forward(type(module).forward)
        elif type(module) in windows:
            fused = _fused_attention_forward(type(module).forward, windows[type(module)])
        else:
            continue
        module.forward = types.MethodType(fused, module)  # type: ignore[method-assign]
        changed += 1
    return changed


# ------------------------------------------------------------------ the module forwards


def _wanted(x: torch.Tensor) -> bool:
    if torch.is_grad_enabled():
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and _interpreted())


def _fused_norm_forward(own: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        if not _wanted(hidden_states):
            return own(self, hidden_states)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    return forward


def _fused_mlp_forward(own: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        if not _wanted(x):
            return own(self, x)
        out: torch.Tensor = self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))
        return out

    return forward


def _fused_attention_forward(
    own: Callable[..., tuple[torch.Tensor, Any]], window: str
) -> Callable[..., tuple[torch.Tensor, Any]]:
    """transformers' attention forward of these classes (5.17), with the rotary embedding as
    one kernel; their own forward when a cache object is passed (the engine passes none)."""

    def forward(
        self: Any,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        if cache is not None or kwargs.get("past_key_values") is not None:
            return own(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attend = ALL_ATTENTION_FUNCTIONS.get(self.config._attn_implementation)
        if attend is None or not _wanted(hidden_states):  # "eager" is no registered function
            return own(self, hidden_states, position_embeddings, attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = rotary(q, k, *position_embeddings)
        if window == "module":
            kwargs["sliding_window"] = self.sliding_window
        elif window == "config":
            kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
        dropout = self.attention_dropout if self.training else 0.0
        out, weights = attend(
            self, q, k, v, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
        )
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights

    return forward


def _windows() -> list[str]:
    """:data:`ATTENTION_CLASSES`' window rules, for the classes this transformers has."""
    import importlib

    found = []
    for module_name, class_name, window in ATTENTION_CLASSES:
        try:
            getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        found.append(window)
    return found


def _is_silu(mlp: Any) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _classes(names: tuple[tuple[str, ...], ...]) -> tuple[type[torch.nn.Module], ...]:
    import importlib

    found: list[type[torch.nn.Module]] = []
    for module_name, class_name, *_ in names:
        try:
            found.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):  # another transformers: that family keeps its own
            continue
    return tuple(found)


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------ the kernels

#: How a kernel rounds a float32 value to the input dtype and back (0: float32, no rounding).
_ROUNDING = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

if _HAVE_TRITON:

    @triton.jit
    def _round(x, ROUND: tl.constexpr):
        if ROUND == 1:
            x = x.to(tl.float16).to(tl.float32)
        elif ROUND == 2:
            x = x.to(tl.bfloat16).to(tl.float32)
        return x

    @triton.jit
    def _rms_norm(x_ptr, w_ptr, out_ptr, x_stride, out_stride, hidden, eps,
                  BLOCK: tl.constexpr, ROUND: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        keep = cols < hidden
        x = tl.load(x_ptr + row * x_stride + cols, mask=keep, other=0.0).to(tl.float32)
        mean_square = tl.sum(x * x, axis=0) / hidden
        normed = _round(x * tl.rsqrt(mean_square + eps), ROUND)
        w = tl.load(w_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        y = w * normed
        tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _silu_mul(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr, ROUND: tl.constexpr):
        at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = at < n
        g = tl.load(g_ptr + at, mask=keep, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + at, mask=keep, other=0.0).to(tl.float32)
        act = _round(g / (1.0 + tl.exp(-g)), ROUND)
        tl.store(out_ptr + at, (act * u).to(out_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _rotary(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out, k_out, tokens, heads,
                qs0, qs1, qs2, qs3, ks0, ks1, ks2, ks3,
                qo0, qo1, qo2, qo3, ko0, ko1, ko2, ko3,
                cs0, cs1, ss0, ss1,
                HALF: tl.constexpr, HALF_P: tl.constexpr, ROUND: tl.constexpr):  # fmt: skip
        # one program per (batch x token, head of q then of k): out = x * cos + rot(x) * sin,
        # rot(x) = cat(-x2, x1), each product and the sum rounded as torch rounds them
        bt = tl.program_id(0)
        h = tl.program_id(1)
        b = bt // tokens
        t = bt % tokens
        if h < heads:
            src = q_ptr + b * qs0 + h * qs1 + t * qs2
            dst = q_out + b * qo0 + h * qo1 + t * qo2
            step_in = qs3
            step_out = qo3
        else:
            src = k_ptr + b * ks0 + (h - heads) * ks1 + t * ks2
            dst = k_out + b * ko0 + (h - heads) * ko1 + t * ko2
            step_in = ks3
            step_out = ko3
        d = tl.arange(0, HALF_P)
        keep = d < HALF
        x1 = tl.load(src + d * step_in, mask=keep, other=0.0).to(tl.float32)
        x2 = tl.load(src + (d + HALF) * step_in, mask=keep, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + b * cs0 + t * cs1 + d, mask=keep, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + b * cs0 + t * cs1 + d + HALF, mask=keep, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + b * ss0 + t * ss1 + d, mask=keep, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + b * ss0 + t * ss1 + d + HALF, mask=keep, other=0.0).to(tl.float32)
        first = _round(_round(x1 * c1, ROUND) + _round(-x2 * s1, ROUND), ROUND)
        second = _round(_round(x2 * c2, ROUND) + _round(x1 * s2, ROUND), ROUND)
        kind = q_out.dtype.element_ty
        tl.store(dst + d * step_out, first.to(kind), mask=keep)
        tl.store(dst + (d + HALF) * step_out, second.to(kind), mask=keep)
