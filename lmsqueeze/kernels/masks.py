"""Pruning masks from scores. Every mask here is a KEEP mask: True where the weight survives.

- rowwise_mask(scores, sparsity): in each row, prune exactly round(sparsity * cols) entries with the
  lowest scores; ties are broken deterministically (the lower column index is pruned first).
- nm_mask(scores, n, m): along the last dimension, in each group of m consecutive entries keep the
  n highest scores (ties: the lower index is pruned first).
- wanda_scores(W, col_sq_norm) = |W| * sqrt(col_sq_norm)[None, :]  (Wanda, compared per output row).
"""
from __future__ import annotations

import torch

from lmsqueeze.errors import LmsqueezeError


def check_nm(n: int, m: int, cols: int | None = None) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or not (0 < n < m):
        raise LmsqueezeError(f"N:M pattern {n}:{m} is invalid; need integers 0 < N < M (e.g. 2:4, 4:8)")
    if cols is not None and cols % m != 0:
        raise LmsqueezeError(f"N:M {n}:{m} needs a width that is a multiple of {m}; this layer has {cols} columns")


def _stable_order(scores: torch.Tensor) -> torch.Tensor:
    """Ascending order along the last dim; equal scores keep index order (lower index first)."""
    return torch.sort(scores.float(), dim=-1, stable=True).indices


def rowwise_mask_ref(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    if not 0.0 <= sparsity < 1.0:
        raise LmsqueezeError(f"sparsity {sparsity} is out of range; valid: 0 <= sparsity < 1")
    rows, cols = scores.shape
    k = int(round(sparsity * cols))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        idx = _stable_order(scores)[:, :k]
        keep.scatter_(1, idx, False)
    return keep


def nm_mask_ref(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    check_nm(n, m, scores.shape[-1])
    groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    idx = _stable_order(groups)[..., : m - n]
    keep = torch.ones_like(groups, dtype=torch.bool)
    keep.scatter_(-1, idx, False)
    return keep.reshape(scores.shape)


def wanda_scores(W: torch.Tensor, col_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j||: W [out, in] (any dtype), col_sq_norm [in] fp32 -> fp32 scores [out, in]."""
    if col_sq_norm.shape != (W.shape[-1],):
        raise LmsqueezeError(f"col_sq_norm has shape {tuple(col_sq_norm.shape)}, expected ({W.shape[-1]},)")
    return W.float().abs() * col_sq_norm.float().sqrt()[None, :]


def rowwise_mask(scores: torch.Tensor, sparsity: float, backend: str | None = None) -> torch.Tensor:
    """KEEP mask pruning exactly round(sparsity * cols) lowest scores in each row of scores [rows, cols]."""
    if scores.dim() != 2:
        raise LmsqueezeError(f"scores must be 2-D [rows, cols], got {tuple(scores.shape)}")
    return rowwise_mask_ref(scores, sparsity)


def nm_mask(scores: torch.Tensor, n: int, m: int, backend: str | None = None) -> torch.Tensor:
    """KEEP mask with exactly n kept in every group of m along the last dimension."""
    return nm_mask_ref(scores, n, m)
