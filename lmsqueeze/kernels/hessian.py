"""Hessian of the layer-wise reconstruction loss, accumulated over calibration batches.

    H  <-  H * n / (n + m)  +  (2 / (n + m)) * X^T X        X: the m valid rows of x, [m, d]

H is fp32 [d, d]; x stays in the model dtype. Layers that read the same input (q/k/v, gate/up)
share one H. Fast paths may fill only the lower triangle (half the FLOPs); `hessian_finalize`
mirrors it once, after the last batch, before anyone reads H.

Backends: "cpu" (csrc/cpu/hessian.cpp: bf16 x through an AVX-512-BF16 micro-kernel over
lower-triangle tiles, fp32/fp16 x through one-triangle blocked fp32 GEMMs), "triton" (CUDA tensors;
CPU tensors under TRITON_INTERPRET=1), "ref". The fast paths write the lower triangle only.
"""
from __future__ import annotations

import torch

from lmsqueeze import _ext
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels._dispatch import choose_backend

IMPLEMENTED = ("ref", "cpu", "triton")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _valid_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if mask is None:
        return x2
    m2 = mask.reshape(-1).to(torch.bool)
    if m2.numel() != x2.shape[0]:
        raise LmsqueezeError(f"mask has {m2.numel()} entries but x has {x2.shape[0]} rows (tokens)")
    return x2[m2]


def hessian_update_ref(H: torch.Tensor, x: torch.Tensor, nsamples: int, mask: torch.Tensor | None = None) -> int:
    """Reference: upcast to fp32, full matmul (what every published tool does). Returns n + m."""
    xv = _valid_rows(x, mask)
    m = xv.shape[0]
    if m == 0:
        return nsamples
    xf = xv.to(torch.float32)
    H.mul_(nsamples / (nsamples + m)).add_(xf.T @ xf, alpha=2.0 / (nsamples + m))
    return nsamples + m


def hessian_finalize(H: torch.Tensor) -> torch.Tensor:
    """Mirror the lower triangle onto the upper one, in place (a no-op on a full symmetric H).

    Whatever the upper triangle held (stale values from before the fast updates) is overwritten.
    CPU: a blocked C++ transpose copy (d = 4096: ~20 ms), which also frees the packed-input
    workspace the bf16 updates keep between batches; elsewhere two triangular torch ops and one
    d x d temporary, no index tensors.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise LmsqueezeError(f"H must be a square matrix, got {tuple(H.shape)}")
    if (H.device.type == "cpu" and H.dtype == torch.float32 and H.is_contiguous()
            and _ext.has_op("hessian_finalize_cpu")):
        _ext.ext().hessian_finalize_cpu(H)
        return H
    strict_lower = torch.tril(H, diagonal=-1)
    H.tril_().add_(strict_lower.T)
    return H


def _check(H, x, nsamples):
    if H.dtype != torch.float32 or H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise LmsqueezeError(f"H must be a square float32 matrix, got {tuple(H.shape)} {H.dtype}")
    if x.dim() < 1 or x.shape[-1] != H.shape[0]:
        raise LmsqueezeError(f"x's last dimension ({tuple(x.shape)}) must equal H's size {H.shape[0]}")
    if x.dtype not in _DTYPES:
        raise LmsqueezeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if nsamples < 0:
        raise LmsqueezeError(f"nsamples must be >= 0, got {nsamples}")
    if H.device != x.device:
        raise LmsqueezeError(f"H is on {H.device} but x is on {x.device}")


def hessian_update(H: torch.Tensor, x: torch.Tensor, nsamples: int, mask: torch.Tensor | None = None,
                   backend: str | None = None) -> int:
    """Fold the valid rows of x ([..., d]) into H ([d, d] fp32) in place; returns the new token count.

    Call hessian_finalize(H) once after the last batch: fast paths update only the lower triangle.
    """
    _check(H, x, nsamples)
    chosen = choose_backend("hessian_update", x.device, backend, IMPLEMENTED)
    if chosen == "ref":
        return hessian_update_ref(H, x, nsamples, mask)
    if not H.is_contiguous():
        raise LmsqueezeError("H must be contiguous for the fast backends (they write its lower triangle in place)")
    if chosen == "triton":
        from lmsqueeze.kernels.triton.hessian import hessian_update_triton

        return hessian_update_triton(H, x, nsamples, mask)
    return int(getattr(_ext.ext(), f"hessian_update_{chosen}")(H, x, int(nsamples), mask))
