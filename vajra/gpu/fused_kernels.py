# mypy: disable-error-code="no-untyped-def, untyped-decorator, misc"
# (the @triton.jit kernels below take untyped pointers and scalars; the launchers are typed)
"""The Triton kernels of :mod:`vajra.gpu.fused_layers`: transformers' RMS norm (alone, and
after the residual add that precedes it), its rotary embedding and the gated MLP activation,
each one launch where transformers runs a chain of small ops.

Semantics, the same as transformers' forwards, rounding included:

* ``rms_norm(x, w)``: reduce ``x`` in float32, round the normalised row to the input dtype,
  multiply by the weight in the dtype torch's promotion gives (the product of two bfloat16
  numbers is exact in float32, so rounding it once matches torch's bfloat16 multiply);
* ``add_rms_norm(x, residual, w)``: ``s = residual + x`` rounded to the input dtype (torch's
  add), then ``rms_norm(s, w)``; returns both (``s`` is the next residual);
* ``rotary(q, k, cos, sin)``: ``x * cos + rotate_half(x) * sin``, each product and the sum
  rounded;
* ``silu_mul(gate, up)``: ``silu(gate)`` rounded to the input dtype, times ``up``, rounded.

The sum of squares runs in another order than torch's ``mean``, so a float32 result may
differ in the last bits. The launchers read only shapes and strides on the host, so a CUDA
graph captures them. They run on CUDA, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, the tests). Tested against the transformers modules in
``tests/gpu/test_fused_layers.py``.
"""

from __future__ import annotations

import logging

import torch

try:
    import triton  # type: ignore[import-untyped]
    import triton.language as tl  # type: ignore[import-untyped]
except ImportError:  # the modules keep their own forwards (vajra.gpu.fused_layers)
    HAVE_TRITON = False
else:
    HAVE_TRITON = True

log = logging.getLogger(__name__)

#: Columns one program of the activation kernel handles.
ACT_BLOCK = 1024


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMS norm of ``x`` over its last dimension, in one kernel."""
    rows, hidden = _rows(x, weight)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch_norm(rows, rows, out, out, weight, eps, add=False)
    return out.view(*x.shape[:-1], hidden)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = residual + x`` and transformers' RMS norm of ``s``, in one kernel; returns
    ``(norm(s), s)``, both new tensors of ``x``'s shape."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"residual {tuple(residual.shape)} {residual.dtype} for x {tuple(x.shape)} {x.dtype}"
        )
    rows, hidden = _rows(x, weight)
    res_rows, _ = _rows(residual, weight)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _launch_norm(rows, res_rows, out, total, weight, eps, add=True)
    shape = (*x.shape[:-1], hidden)
    return out.view(shape), total.view(shape)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` as transformers' MLP computes it, in one kernel. Rows may be
    strided (the halves of one merged gate-and-up projection); each row's elements must be
    adjacent. Returns a new contiguous tensor."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {gate.shape} {gate.dtype} and up {up.shape} {up.dtype} differ")
    width = gate.shape[-1]
    g, u = (_row_view(t) for t in (gate, up))
    out = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    if out.numel():
        _silu_mul[(g.shape[0], triton.cdiv(width, ACT_BLOCK))](
            g, u, out, width, g.stride(0), u.stride(0), out.stride(0),
            BLOCK=ACT_BLOCK, ROUND=_ROUNDING[g.dtype], num_warps=4,
        )  # fmt: skip
    return out.view(gate.shape)


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
    result), which is also logged. The engine then installs none of the fused forwards and
    says why, rather than failing every step."""
    why = _check(device, dtype, hidden, head_dim)
    if why is not None:
        log.error("fused layers not installed: %s", why)
    return why


def _check(
    device: torch.device | str, dtype: torch.dtype, hidden: int, head_dim: int
) -> str | None:
    if not HAVE_TRITON:
        return "triton does not import"
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

    try:
        with torch.no_grad():
            x, res, w = rand(3, hidden), rand(3, hidden), rand(hidden)
            pairs = [(rms_norm(x, w, 1e-5), norm(x, w))]
            normed, total = add_rms_norm(x, res, w, 1e-5)
            pairs += [(total, res + x), (normed, norm(res + x, w))]
            gate_up = rand(3, 4 * hidden)
            gate, up = gate_up[:, : 2 * hidden], gate_up[:, 2 * hidden :]
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


def _rows(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} for rows of {hidden}")
    return _row_view(x), hidden


def _row_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last]`` with adjacent elements in a row: a view where the strides
    allow one, else a contiguous copy."""
    if x.stride(-1) == 1:
        try:
            return x.view(-1, x.shape[-1])
        except RuntimeError:  # rows that no single stride describes
            pass
    return x.reshape(-1, x.shape[-1]).contiguous()


def _launch_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    out: torch.Tensor,
    total: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    add: bool,
) -> None:
    rows, hidden = x.shape
    if not rows:
        return
    block = triton.next_power_of_2(hidden)
    _rms_norm[(rows,)](
        x, residual, weight, out, total,
        x.stride(0), residual.stride(0), out.stride(0), total.stride(0), hidden, float(eps),
        BLOCK=block,
        ROUND=_ROUNDING[x.dtype],
        ADD=add,
        num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip


#: How a kernel rounds a float32 value to the input dtype and back (0: float32, no rounding).
_ROUNDING = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

if HAVE_TRITON:

    @triton.jit
    def _round(x, ROUND: tl.constexpr):
        if ROUND == 1:
            x = x.to(tl.float16).to(tl.float32)
        elif ROUND == 2:
            x = x.to(tl.bfloat16).to(tl.float32)
        return x

    @triton.jit
    def _rms_norm(x_ptr, r_ptr, w_ptr, out_ptr, total_ptr,
                  x_stride, r_stride, out_stride, total_stride, hidden, eps,
                  BLOCK: tl.constexpr, ROUND: tl.constexpr, ADD: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        keep = cols < hidden
        x = tl.load(x_ptr + row * x_stride + cols, mask=keep, other=0.0).to(tl.float32)
        if ADD:  # the residual add first, rounded as torch's add; it is the next residual
            r = tl.load(r_ptr + row * r_stride + cols, mask=keep, other=0.0).to(tl.float32)
            x = _round(r + x, ROUND)
            kind = total_ptr.dtype.element_ty
            tl.store(total_ptr + row * total_stride + cols, x.to(kind), mask=keep)
        mean_square = tl.sum(x * x, axis=0) / hidden
        normed = _round(x * tl.rsqrt(mean_square + eps), ROUND)
        w = tl.load(w_ptr + cols, mask=keep, other=0.0).to(tl.float32)
        y = w * normed
        tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _silu_mul(g_ptr, u_ptr, out_ptr, width, g_stride, u_stride, out_stride,
                  BLOCK: tl.constexpr, ROUND: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        at = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = at < width
        g = tl.load(g_ptr + row * g_stride + at, mask=keep, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * u_stride + at, mask=keep, other=0.0).to(tl.float32)
        act = _round(g / (1.0 + tl.exp(-g)), ROUND)
        kind = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * out_stride + at, (act * u).to(kind), mask=keep)

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
