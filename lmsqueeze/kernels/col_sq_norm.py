"""Running squared column norms of a layer's inputs, the only statistic Wanda needs.

    s  <-  s * n / (n + m)  +  (1 / (n + m)) * sum_{valid t} x[t, :]^2

where n is the number of tokens already folded into s and m the number of valid (non-padding)
tokens in x. s is the per-column mean of x^2, so s * N = ||X_j||_2^2 over all N tokens seen; Wanda
ranks |W_ij| * sqrt(s_j) within a row, which a constant factor does not change.

Memory-bound: each element of x is read once (2 bytes in bf16) for one multiply-add, so the fast
paths are streaming reads; a full Hessian (d x d) for Wanda would cost d times more work.
"""
from __future__ import annotations

import torch

from lmsqueeze import _ext
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels._dispatch import choose_backend

IMPLEMENTED = ("ref", "cpu", "cuda", "triton")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _flatten(x: torch.Tensor, mask: torch.Tensor | None):
    x2 = x.reshape(-1, x.shape[-1])
    m2 = None if mask is None else mask.reshape(-1).to(torch.bool)
    if m2 is not None and m2.numel() != x2.shape[0]:
        raise LmsqueezeError(f"mask has {m2.numel()} entries but x has {x2.shape[0]} rows (tokens)")
    return x2, m2


def col_sq_norm_update_ref(s: torch.Tensor, x: torch.Tensor, nsamples: int, mask: torch.Tensor | None = None) -> int:
    """Reference: upcast to fp32, drop padding rows, sum squares. Updates s in place; returns n + m."""
    x2, m2 = _flatten(x, mask)
    if m2 is not None:
        x2 = x2[m2]
    m = x2.shape[0]
    if m == 0:
        return nsamples
    xf = x2.to(torch.float32)
    s.mul_(nsamples / (nsamples + m)).add_((xf * xf).sum(dim=0) / (nsamples + m))
    return nsamples + m


def _check(s: torch.Tensor, x: torch.Tensor, nsamples: int) -> None:
    if s.dtype != torch.float32 or s.dim() != 1:
        raise LmsqueezeError(f"s must be a 1-D float32 tensor, got {tuple(s.shape)} {s.dtype}")
    if x.dim() < 1 or x.shape[-1] != s.shape[0]:
        raise LmsqueezeError(f"x's last dimension ({tuple(x.shape)}) must equal len(s) = {s.shape[0]}")
    if x.dtype not in _DTYPES:
        raise LmsqueezeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if nsamples < 0:
        raise LmsqueezeError(f"nsamples must be >= 0, got {nsamples}")
    if s.device != x.device:
        raise LmsqueezeError(f"s is on {s.device} but x is on {x.device}")


def col_sq_norm_update(
    s: torch.Tensor, x: torch.Tensor, nsamples: int, mask: torch.Tensor | None = None, backend: str | None = None
) -> int:
    """Fold the valid rows of x ([..., d], model dtype) into s ([d], fp32) in place; returns the new count.

    mask: [...] matching x's leading dimensions, True for real tokens (padding never counts).
    backend: None (auto), "ref", "cpu", "cuda" or "triton"; LMSQUEEZE_BACKEND forces one too.
    """
    _check(s, x, nsamples)
    chosen = choose_backend("col_sq_norm_update", x.device, backend, IMPLEMENTED)
    if chosen == "ref":
        return col_sq_norm_update_ref(s, x, nsamples, mask)
    if chosen == "triton":
        from lmsqueeze.kernels.triton.col_sq_norm import col_sq_norm_update_triton

        return col_sq_norm_update_triton(s, x, nsamples, mask)
    if not s.is_contiguous():
        raise LmsqueezeError("s must be contiguous for the compiled backends")
    fn = getattr(_ext.ext(), f"col_sq_norm_update_{chosen}")
    return int(fn(s, x, int(nsamples), mask))
