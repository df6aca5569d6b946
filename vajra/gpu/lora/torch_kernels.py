"""The torch path of the multi-LoRA layer: the semantics of :mod:`vajra.gpu.lora.layer` in
plain torch ops, for the CPU (and CUDA without Triton). ``x``/``y`` are a batch's packed tokens,
``[tokens, in]`` / ``[tokens, out]``; ``a``/``bt`` one module's page views of the pool,
``[pages, in]`` / ``[pages, out]``."""

from __future__ import annotations

import torch


def lora_bgmv(
    x: torch.Tensor,  # [tokens, in]
    y: torch.Tensor,  # [tokens, out], updated in place
    tokens: torch.Tensor,  # [n] int: the tokens to compute
    pages: torch.Tensor,  # [n, width] int: each token's adapter's pages (zero page past its rank)
    a: torch.Tensor,  # [pages, in]
    bt: torch.Tensor,  # [pages, out]
) -> None:
    """``y[tokens[i]] += (x[tokens[i]] @ a[pages[i]]^T) @ bt[pages[i]]``: each token with its
    own adapter's rows, gathered; two batched matmuls for all ``n`` tokens."""
    xs = x.index_select(0, tokens).unsqueeze(-1)  # [n, in, 1]
    xa = torch.bmm(a[pages], xs)  # [n, width, 1]
    delta = torch.bmm(xa.transpose(1, 2), bt[pages])  # [n, 1, out]
    y.index_add_(0, tokens, delta.squeeze(1))


def lora_sgmv(
    x: torch.Tensor,  # [tokens, in]
    y: torch.Tensor,  # [tokens, out], updated in place
    start: int,
    end: int,
    a_rows: torch.Tensor,  # [rank, in]: one adapter's rows (a view of the pool, or gathered)
    bt_rows: torch.Tensor,  # [rank, out]
) -> None:
    """``y[start:end] += (x[start:end] @ a_rows^T) @ bt_rows``: one segment, one adapter."""
    y[start:end] += (x[start:end] @ a_rows.t()) @ bt_rows


def lora_tokens(
    x: torch.Tensor,  # [tokens, in]
    y: torch.Tensor,  # [tokens, out], updated in place
    tokens: torch.Tensor,  # [n] int: tokens that use one adapter, anywhere in the batch
    a_rows: torch.Tensor,  # [rank, in]
    bt_rows: torch.Tensor,  # [rank, out]
) -> None:
    """``y[tokens] += (x[tokens] @ a_rows^T) @ bt_rows``: scattered tokens of one adapter."""
    y.index_add_(0, tokens, (x.index_select(0, tokens) @ a_rows.t()) @ bt_rows)


def adapter_rows(
    view: torch.Tensor, rows: slice | torch.Tensor
) -> torch.Tensor:  # [pages, n] -> [rank, n]
    """An adapter's rows of a page view: a slice (one run of pages) or its pages gathered."""
    if isinstance(rows, slice):
        return view[rows]
    return view.index_select(0, rows)
