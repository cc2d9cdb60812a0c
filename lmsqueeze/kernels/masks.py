"""Pruning masks from scores. Every mask here is a KEEP mask: True where the weight survives.

- rowwise_mask(scores, sparsity): in each row, prune exactly round(sparsity * cols) entries with the
  lowest scores; ties are broken deterministically (the lower column index is pruned first).
- nm_mask(scores, n, m): along the last dimension, in each group of m consecutive entries keep the
  n highest scores (ties: the lower index is pruned first).
- wanda_scores(W, col_sq_norm) = |W| * sqrt(col_sq_norm)[None, :]  (Wanda, compared per output row).
- wanda_mask(W, col_sq_norm, sparsity | n, m): the two above fused; the fast paths compute each
  score in registers and never write the [out, in] score matrix.

Backends: "cpu" (csrc/cpu/masks.cpp: per-row selection of the k-th key without sorting, N:M by
in-register ranks, OpenMP over rows), "triton" (CUDA tensors; CPU tensors under
TRITON_INTERPRET=1), "ref" (stable sorts). All return bit-identical masks: the scores are the same
fp32 numbers and the tie rule is exact.
"""
from __future__ import annotations

import torch

from lmsqueeze import _ext
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels._dispatch import choose_backend

IMPLEMENTED = ("ref", "cpu", "triton")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_nm(n: int, m: int, cols: int | None = None) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or not (0 < n < m):
        raise LmsqueezeError(f"N:M pattern {n}:{m} is invalid; need integers 0 < N < M (e.g. 2:4, 4:8)")
    if cols is not None and cols % m != 0:
        raise LmsqueezeError(f"N:M {n}:{m} needs a width that is a multiple of {m}; this layer has {cols} columns")


def _stable_order(scores: torch.Tensor) -> torch.Tensor:
    """Ascending order along the last dim; equal scores keep index order (lower index first)."""
    return torch.sort(scores.float(), dim=-1, stable=True).indices


def _check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise LmsqueezeError(f"sparsity {sparsity} is out of range; valid: 0 <= sparsity < 1")


def prune_count(sparsity: float, cols: int) -> int:
    """How many entries of a row of `cols` a row-wise mask prunes: round(sparsity * cols)."""
    return int(round(sparsity * cols))


def rowwise_mask_ref(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    _check_sparsity(sparsity)
    rows, cols = scores.shape
    k = prune_count(sparsity, cols)
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


def wanda_mask_ref(W: torch.Tensor, col_sq_norm: torch.Tensor, sparsity: float | None = None,
                   n: int | None = None, m: int | None = None) -> torch.Tensor:
    """Reference of the fused path: wanda_scores, then rowwise_mask_ref or nm_mask_ref."""
    scores = wanda_scores(W, col_sq_norm)
    return rowwise_mask_ref(scores, sparsity) if sparsity is not None else nm_mask_ref(scores, n, m)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dtype not in _DTYPES:
        raise LmsqueezeError(f"scores must be float32, bfloat16 or float16, got {scores.dtype}")


def _check_out(out: torch.Tensor | None, shape: torch.Size, device: torch.device) -> None:
    if out is None:
        return
    if out.dtype != torch.bool or tuple(out.shape) != tuple(shape) or not out.is_contiguous() or out.device != device:
        raise LmsqueezeError(f"out must be a contiguous bool tensor of shape {tuple(shape)} on {device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")


def _into(out: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """keep, written into out when one was given (the paths that cannot write in place)."""
    if out is None:
        return keep
    return out.copy_(keep)


def rowwise_mask(scores: torch.Tensor, sparsity: float, backend: str | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """KEEP mask pruning exactly round(sparsity * cols) lowest scores in each row of scores [rows, cols].

    out: an optional bool tensor of the scores' shape to write into (saves allocating the mask,
    which on the CPU can cost more than computing it); it is returned.
    """
    if scores.dim() != 2:
        raise LmsqueezeError(f"scores must be 2-D [rows, cols], got {tuple(scores.shape)}")
    _check_scores(scores)
    _check_sparsity(sparsity)
    _check_out(out, scores.shape, scores.device)
    chosen = choose_backend("rowwise_mask", scores.device, backend, IMPLEMENTED)
    if chosen == "ref":
        return _into(out, rowwise_mask_ref(scores, sparsity))
    k = prune_count(sparsity, scores.shape[1])
    if chosen == "triton":
        from lmsqueeze.kernels.triton.masks import mask_triton

        return _into(out, mask_triton(scores, None, k=k))
    return _ext.ext().rowwise_mask_cpu(scores.float(), k, out)


def nm_mask(scores: torch.Tensor, n: int, m: int, backend: str | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """KEEP mask with exactly n kept in every group of m along the last dimension (out: as rowwise_mask)."""
    if scores.dim() < 1:
        raise LmsqueezeError("scores must have at least one dimension")
    _check_scores(scores)
    check_nm(n, m, scores.shape[-1])
    _check_out(out, scores.shape, scores.device)
    chosen = choose_backend("nm_mask", scores.device, backend, IMPLEMENTED)
    if chosen == "ref":
        return _into(out, nm_mask_ref(scores, n, m))
    if chosen == "triton":
        from lmsqueeze.kernels.triton.masks import mask_triton

        flat = scores.reshape(-1, scores.shape[-1])
        return _into(out, mask_triton(flat, None, n=n, m=m).reshape(scores.shape))
    return _ext.ext().nm_mask_cpu(scores.float(), n, m, out)


def wanda_mask(W: torch.Tensor, col_sq_norm: torch.Tensor, sparsity: float | None = None, n: int | None = None,
               m: int | None = None, backend: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """KEEP mask of Wanda in one pass from W [out, in] and the input's col_sq_norm [in].

    Give either `sparsity` (exact count per output row) or `n` and `m` (N:M along the input dim).
    Same result as wanda_mask_ref, bit for bit. out: as rowwise_mask.
    """
    if W.dim() != 2:
        raise LmsqueezeError(f"W must be 2-D [out, in], got {tuple(W.shape)}")
    if W.dtype not in _DTYPES:
        raise LmsqueezeError(f"W must be float32, bfloat16 or float16, got {W.dtype}")
    if col_sq_norm.shape != (W.shape[1],):
        raise LmsqueezeError(f"col_sq_norm has shape {tuple(col_sq_norm.shape)}, expected ({W.shape[1]},)")
    if col_sq_norm.device != W.device:
        raise LmsqueezeError(f"W is on {W.device} but col_sq_norm is on {col_sq_norm.device}")
    if (sparsity is None) == (n is None and m is None):
        raise LmsqueezeError("wanda_mask needs either sparsity or n and m (N:M), not both and not neither")
    if sparsity is not None:
        _check_sparsity(sparsity)
    else:
        check_nm(n, m, W.shape[1])
    _check_out(out, W.shape, W.device)
    chosen = choose_backend("wanda_mask", W.device, backend, IMPLEMENTED)
    if chosen == "ref":
        return _into(out, wanda_mask_ref(W, col_sq_norm, sparsity, n, m))
    k = prune_count(sparsity, W.shape[1]) if sparsity is not None else -1
    if chosen == "triton":
        from lmsqueeze.kernels.triton.masks import mask_triton

        return _into(out, mask_triton(W, col_sq_norm, k=k, n=n or 0, m=m or 0))
    return _ext.ext().wanda_mask_cpu(W, col_sq_norm.float(), k, n or 0, m or 0, out)
