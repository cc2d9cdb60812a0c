"""Hessian accumulation in Triton, lower-triangle tiles only.

    H[I, J]  <-  a * H[I, J]  +  b * X[:, I]^T X[:, J]      for J <= I,   a = n/(n+m), b = 2/(n+m)

A 1-D grid runs over the T(T+1)/2 tile pairs of the lower triangle (T = cdiv(d, BLOCK)): program
`pid` owns pair (bi, bj) with pid = bi(bi+1)/2 + bj, so the upper tiles are never launched, half the
FLOPs of x.T @ x. Each program streams the tokens in slabs of BLOCK_K; the padding mask is applied
in the load (a padding row reads as zeros and adds nothing), and `tl.dot` multiplies the bf16/fp16
operands on the tensor cores with an fp32 accumulator (fp32 x uses IEEE fp32 dot, never TF32). The
scaling is fused into the one read-modify-write of the H tile; entries above the diagonal of a
diagonal tile are not stored. Traffic: x is read T times by column blocks (L2 absorbs most of it),
H once.

Naive version, for reading: H.mul_(a).add_(b * xf.T @ xf) with xf the valid rows in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmsqueeze.kernels.triton import INTERPRET


@triton.jit
def _hessian_tril_kernel(
    x_ptr, mask_ptr, h_ptr,
    rows, d, a, b,
    stride_xt, stride_xd, stride_h,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    # (bi, bj) from pid = bi * (bi + 1) / 2 + bj; the float root is exact after one correction step
    bi = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    bi = tl.where(bi * (bi + 1) // 2 > pid, bi - 1, bi)
    bi = tl.where((bi + 1) * (bi + 2) // 2 <= pid, bi + 1, bi)
    bj = pid - bi * (bi + 1) // 2
    offs_i = bi * BLOCK + tl.arange(0, BLOCK)
    offs_j = bj * BLOCK + tl.arange(0, BLOCK)
    ok_i = offs_i < d
    ok_j = offs_j < d
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for t0 in range(0, rows, BLOCK_K):
        t = t0 + tl.arange(0, BLOCK_K)
        row_ok = t < rows
        if HAS_MASK:
            row_ok = row_ok & (tl.load(mask_ptr + t, mask=row_ok, other=0) != 0)
        xi = tl.load(x_ptr + t[:, None] * stride_xt + offs_i[None, :] * stride_xd,
                     mask=row_ok[:, None] & ok_i[None, :], other=0.0)   # [BLOCK_K, BLOCK]
        xj = tl.load(x_ptr + t[:, None] * stride_xt + offs_j[None, :] * stride_xd,
                     mask=row_ok[:, None] & ok_j[None, :], other=0.0)   # [BLOCK_K, BLOCK]
        if UPCAST:  # interpreter only: its bf16 tl.dot is wrong; bf16 products are exact in fp32
            xi = xi.to(tl.float32)
            xj = xj.to(tl.float32)
        if IEEE:
            acc = tl.dot(tl.trans(xi), xj, acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(xi), xj, acc)
    h_ptrs = h_ptr + offs_i[:, None] * stride_h + offs_j[None, :]
    lower = ok_i[:, None] & (offs_j[None, :] <= offs_i[:, None])
    h = tl.load(h_ptrs, mask=lower, other=0.0)
    tl.store(h_ptrs, a * h + b * acc, mask=lower)


def hessian_update_triton(H: torch.Tensor, x: torch.Tensor, nsamples: int, mask: torch.Tensor | None = None) -> int:
    """Lower triangle of H ([d, d] fp32, contiguous) updated in place; returns n + m."""
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    rows = x2.shape[0]
    if mask is not None:
        m8 = mask.reshape(-1).to(device=x.device, dtype=torch.uint8).contiguous()
        m = int(m8.sum().item())
    else:
        m8, m = None, rows
    if m == 0:
        return nsamples
    a = nsamples / (nsamples + m)
    b = 2.0 / (nsamples + m)
    if INTERPRET:
        BLOCK, BLOCK_K, warps, stages = 32, 32, 4, 1
    else:
        BLOCK, BLOCK_K, warps, stages = 128, 32, 8, 3
    tiles = triton.cdiv(d, BLOCK)
    grid = (tiles * (tiles + 1) // 2,)
    _hessian_tril_kernel[grid](
        x2, m8 if m8 is not None else x2, H,
        rows, d, a, b,
        x2.stride(0), x2.stride(1), H.stride(0),
        HAS_MASK=m8 is not None, UPCAST=INTERPRET and x2.dtype == torch.bfloat16,
        IEEE=x2.dtype == torch.float32, BLOCK=BLOCK, BLOCK_K=BLOCK_K, num_warps=warps, num_stages=stages,
    )
    return nsamples + m
