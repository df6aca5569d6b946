"""Fused forwards for the decoder layers of Llama-family models: fewer, larger kernels per
decode step, with transformers' numbers.

Why: a decode step of a small model on a GPU is bound by how many kernels it launches, not
by their arithmetic. On an H200 the Llama-3.2-1B-shaped step at 32 rows and 128 tokens of
context took 3.46 ms from a CUDA graph against a memory-bandwidth floor of 0.51 ms
(docs/benchmarks.md, "The resized `make gpu-check` on an H200"). Per layer, transformers runs
its RMS norm as eight kernels (twice), its rotary embedding as ten, the MLP's activation and
product as two, the two residual adds as two more, and seven projections. Here, per layer:

* every RMS norm is one kernel, and the norm after each residual add is fused with that add
  (:func:`vajra.gpu.fused_kernels.add_rms_norm`): the add after the attention with the
  layer's second norm, the add after the MLP with the next layer's first norm (or the
  model's last); the decoder layer hands the normed rows to that norm, which returns them
  when it is called on the very tensor the layer returned, and computes as usual otherwise;
* the rotary embedding of queries and keys is one kernel, and the cosines and sines it
  reads are one gather per step from a table made at :func:`install` (one row per position
  below ``max_positions``, in the model's dtype, computed by the rotary module's own forward),
  where transformers computes them from the positions with ten kernels; rotary modules whose
  frequencies change with the length (``dynamic`` and ``longrope`` scaling) keep their own
  forward;
* the query, key and value projections are one matmul, and so are the MLP's gate and up
  projections, whose activation and product is one kernel reading both halves in place.
  The merged weights are made once at :func:`install`: each projection's weight (and bias)
  becomes a view of its rows of the merged one, so no memory is added and the modules keep
  working alone. Projections wrapped for LoRA (:class:`vajra.gpu.lora.MultiLoraLinear`)
  then add their adapters' deltas in place to their columns of the merged output; on the
  Triton path one shrink and one expand launch serve the query, key and value together (and
  gate and up), where each module took its own pair.

Where: :func:`install` swaps the ``forward`` of the modules of the classes below (their
forwards are transformers', checked on transformers 5.17 to 5.24). A fused forward runs only
when no gradient is wanted and the input is on a CUDA device (or on the CPU under Triton's
interpreter, for the tests); otherwise, as in training (:mod:`vajra.gpu.training`, which
shares the model), the module's own forward runs. The attention's fused forward also steps
aside when a cache object is passed (the engine passes none). The kernels
(:mod:`vajra.gpu.fused_kernels`) read only shapes on the host, so a CUDA graph captures them
(:mod:`vajra.gpu.decode_graphs`). The merged weights are not moved by a later
``model.to(...)``: install after the model is on its device, as the engine does.

Tested in Triton's interpreter on CPU tensors against the transformers modules and the model's
own logits (``tests/gpu/test_fused_layers.py``); the CUDA test compares them on the device.
"""

from __future__ import annotations

import importlib
import os
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vajra.gpu.fused_kernels import HAVE_TRITON, add_rms_norm, check, rms_norm, rotary, silu_mul
from vajra.gpu.lora.layer import add_deltas

__all__ = ["available", "check", "install"]  # check: the kernels' start-up check

_FAMILIES = (
    ("transformers.models.llama.modeling_llama", "Llama"),
    ("transformers.models.mistral.modeling_mistral", "Mistral"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2"),
)
#: What each family's attention passes its attention function as ``sliding_window``: none,
#: its config's, its own.
_WINDOWS = {"Llama": "none", "Mistral": "config", "Qwen2": "module"}
#: Where a decoder layer leaves the rows it normed for the next norm (see the docstring).
_PRENORMED = "_vajra_prenormed"


def available(device: torch.device | str) -> bool:
    """Whether the fused forwards can run on ``device``: CUDA with triton importable."""
    return torch.device(device).type == "cuda" and HAVE_TRITON


def install(model: Any, max_positions: int | None = None) -> int:
    """Give the model's matching norms, attentions, MLPs, decoder layers and rotary
    embeddings the fused forwards (see the module docstring); returns how many modules
    changed. Does nothing without triton, nor to a module already changed.

    ``max_positions``: the rotary table's rows (default: the model's
    ``max_position_embeddings``); a fused forward must never see a position at or past it,
    which the engine guarantees for its ``max_model_len``."""
    if not HAVE_TRITON:
        return 0
    kinds = _classes()
    rows = int(max_positions or model.config.max_position_embeddings)
    next_norms = _next_norms(model, kinds["norm"], kinds["decoder"])
    changed = 0
    fused: Callable[..., Any]
    for module in model.modules():
        if "forward" in vars(module):  # already installed, or someone else's
            continue
        own = type(module).forward
        if isinstance(module, kinds["norm"]):
            fused = _fused_norm_forward(own)
        elif isinstance(module, kinds["mlp"]) and _is_silu(module):
            merged = _merge((module.gate_proj, module.up_proj))
            fused = _fused_mlp_forward(own, merged)
        elif type(module) in kinds["attention"]:
            merged = _merge((module.q_proj, module.k_proj, module.v_proj))
            fused = _fused_attention_forward(own, kinds["attention"][type(module)], merged)
        elif isinstance(module, kinds["decoder"]) and _has_fused_norms(module, kinds["norm"]):
            fused = _fused_decoder_forward(own, next_norms.get(id(module)))
        elif isinstance(module, kinds["rotary"]) and _static_frequencies(module):
            fused = _tabled_rotary_forward(own, _rotary_table(module, own, model, rows))
        else:
            continue
        module.forward = types.MethodType(fused, module)
        changed += 1
    return changed


# ------------------------------------------------------------------ the module forwards

Merged = tuple[torch.Tensor, torch.Tensor | None, list[int]]  # weight, bias, rows of each


def _wanted(x: torch.Tensor) -> bool:
    if torch.is_grad_enabled():
        return False
    return x.device.type == "cuda" or (
        x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    )


def _fused_norm_forward(own: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
        if not _wanted(hidden_states):
            return own(self, hidden_states)
        handed = self.__dict__.pop(_PRENORMED, None)
        if handed is not None and handed[0] is hidden_states:  # normed with the add before
            normed: torch.Tensor = handed[1]
            return normed
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    return forward


def _fused_decoder_forward(
    own: Callable[..., torch.Tensor], next_norm: Any
) -> Callable[..., torch.Tensor]:
    """transformers' decoder layer, each residual add fused with the norm after it."""

    def forward(self: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or not _wanted(hidden_states):
            return own(self, hidden_states, *args, **kwargs)
        h = self.input_layernorm(hidden_states)
        h, _ = self.self_attn(hidden_states=h, **kwargs)
        post: Any = self.post_attention_layernorm
        h, residual = add_rms_norm(h, hidden_states, post.weight, post.variance_epsilon)
        h = self.mlp(h)
        if next_norm is None:
            out: torch.Tensor = residual + h
            return out
        normed, out = add_rms_norm(h, residual, next_norm.weight, next_norm.variance_epsilon)
        next_norm.__dict__[_PRENORMED] = (out, normed)
        return out

    return forward


def _fused_mlp_forward(
    own: Callable[..., torch.Tensor], merged: Merged | None
) -> Callable[..., torch.Tensor]:
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        if not _wanted(x):
            return own(self, x)
        gate, up = _project((self.gate_proj, self.up_proj), merged, x)
        out: torch.Tensor = self.down_proj(silu_mul(gate, up))
        return out

    return forward


def _fused_attention_forward(
    own: Callable[..., tuple[torch.Tensor, Any]], window: str, merged: Merged | None
) -> Callable[..., tuple[torch.Tensor, Any]]:
    """transformers' attention forward of these classes, with one projection for queries,
    keys and values and the rotary embedding as one kernel; their own forward when a cache
    object is passed (the engine passes none)."""

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
        qkv = _project((self.q_proj, self.k_proj, self.v_proj), merged, hidden_states)
        q, k, v = (t.view(shape).transpose(1, 2) for t in qkv)
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


def _tabled_rotary_forward(
    own: Callable[..., tuple[torch.Tensor, torch.Tensor]], table: torch.Tensor
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The rotary module's cosines and sines for ``position_ids``, gathered from ``table``
    ``[positions, 2, head_dim]`` in one kernel: views ``[B, T, head_dim]`` of the gathered rows
    (the rotary kernel reads them where they lie)."""

    def forward(
        self: Any, x: torch.Tensor, position_ids: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if args or kwargs or not _wanted(x) or (table.device, table.dtype) != (x.device, x.dtype):
            return own(self, x, position_ids, *args, **kwargs)
        rows = table.index_select(0, position_ids.reshape(-1))
        both = rows.view(*position_ids.shape, *table.shape[1:])
        return both[..., 0, :], both[..., 1, :]

    return forward


# ------------------------------------------------------------------ install's helpers


def _static_frequencies(rotary: Any) -> bool:
    """Whether a rotary module's frequencies are the same at every length (not ``dynamic``
    nor ``longrope`` scaling, which transformers recomputes from the positions it sees)."""
    kind = getattr(rotary, "rope_type", None)
    return isinstance(kind, str) and "dynamic" not in kind and kind != "longrope"


def _rotary_table(rotary: Any, own: Callable[..., Any], model: Any, rows: int) -> torch.Tensor:
    """``[rows, 2, head_dim]``: the module's own cosines and sines at positions ``0 ..
    rows - 1``, in the model's dtype on the module's device."""
    weight = next(model.parameters())
    device = rotary.inv_freq.device
    with torch.no_grad():
        x = torch.empty(0, dtype=weight.dtype, device=device)
        positions = torch.arange(rows, device=device).view(1, rows)
        cos, sin = own(rotary, x, positions)
    return torch.stack((cos[0], sin[0]), dim=1).contiguous()


def _merge(projections: Sequence[nn.Module]) -> Merged | None:
    """One weight (and bias) holding the rows of ``projections`` in order, each projection's
    own now a view of its rows (no memory added); None where they cannot share one: not all
    plain linear layers (a LoRA wrapper's base layer counts), differing inputs, dtypes or
    devices, a bias on some only."""
    linears: list[nn.Linear] = []
    for projection in projections:
        lin = getattr(projection, "base_layer", projection)
        if type(lin) is not nn.Linear:
            return None
        linears.append(lin)
    first = linears[0].weight
    if any(
        lin.weight.dtype != first.dtype
        or lin.weight.device != first.device
        or lin.in_features != linears[0].in_features
        or not lin.weight.is_floating_point()
        for lin in linears
    ):
        return None
    biased = [lin.bias is not None for lin in linears]
    if any(biased) and not all(biased):
        return None
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        bias = (
            torch.cat([lin.bias for lin in linears if lin.bias is not None])
            if all(biased)
            else None
        )
    sizes = [lin.out_features for lin in linears]
    start = 0
    for lin, rows in zip(linears, sizes, strict=True):
        lin.weight = nn.Parameter(weight[start : start + rows], lin.weight.requires_grad)
        if bias is not None and lin.bias is not None:
            lin.bias = nn.Parameter(bias[start : start + rows], lin.bias.requires_grad)
        start += rows
    return weight, bias, sizes


def _project(
    projections: Sequence[nn.Module], merged: Merged | None, x: torch.Tensor
) -> list[torch.Tensor]:
    """Each projection of ``x``: with a merged weight one matmul, then the projections' LoRA
    deltas (of :class:`vajra.gpu.lora.MultiLoraLinear` layers, when the batch has adapters)
    added in place to their columns, together (one BGMV launch pair on the Triton path);
    else each projection alone."""
    if merged is None:
        return [p(x) for p in projections]
    weight, bias, sizes = merged
    return add_deltas(projections, x, torch.split(F.linear(x, weight, bias), sizes, dim=-1))


def _next_norms(
    model: Any, norms: tuple[type[nn.Module], ...], decoders: tuple[type[nn.Module], ...]
) -> dict[int, nn.Module]:
    """Per decoder layer (by id) of a model's layer stack, the norm that runs next on what the
    layer returns: the next layer's first norm, or the model's last after the last layer."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        layers, last = getattr(module, "layers", None), getattr(module, "norm", None)
        if not isinstance(layers, nn.ModuleList) or not isinstance(last, norms):
            continue
        stack = list(layers)
        for i, layer in enumerate(stack):
            if not isinstance(layer, decoders):
                continue
            after = stack[i + 1].input_layernorm if i + 1 < len(stack) else last
            if isinstance(after, norms):
                found[id(layer)] = after
    return found


def _has_fused_norms(layer: nn.Module, norms: tuple[type[nn.Module], ...]) -> bool:
    return all(
        isinstance(getattr(layer, name, None), norms)
        for name in ("input_layernorm", "post_attention_layernorm")
    )


def _is_silu(mlp: Any) -> bool:
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _classes() -> dict[str, Any]:
    """The classes of :data:`_FAMILIES` this transformers has, by kind; for the attention
    classes, a mapping to their sliding-window rule."""
    kinds: dict[str, list[type[nn.Module]]] = {"norm": [], "mlp": [], "decoder": [], "rotary": []}
    attention: dict[type[nn.Module], str] = {}
    for module_name, prefix in _FAMILIES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # another transformers: that family keeps its own forwards
            continue
        for kind, suffix in (
            ("norm", "RMSNorm"),
            ("mlp", "MLP"),
            ("decoder", "DecoderLayer"),
            ("rotary", "RotaryEmbedding"),
        ):
            if (cls := getattr(module, prefix + suffix, None)) is not None:
                kinds[kind].append(cls)
        if (cls := getattr(module, prefix + "Attention", None)) is not None:
            attention[cls] = _WINDOWS[prefix]
    return {**{k: tuple(v) for k, v in kinds.items()}, "attention": attention}
