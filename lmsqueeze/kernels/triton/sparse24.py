"""2:4 sparse matmul for small batches in Triton: y [M, N] = x [M, K] @ W.T + bias, W 2:4 compressed.

Program (i, j) owns output columns [j*BLOCK_N, (j+1)*BLOCK_N) and rows [i*BLOCK_M, ...). For each
BLOCK_K slab of the input dimension it loads the compressed tile (values [BLOCK_N, BLOCK_K/2] and
meta [BLOCK_N, BLOCK_K/16]) and rebuilds the dense tile in registers:

    W[n, k] = values[n, 2g]      if k % 4 == i0(n, g)     g = k // 4, (i0, i1) from meta's 4 bits
            = values[n, 2g + 1]  if k % 4 == i1(n, g)
            = 0                  otherwise

then one tl.dot with the x tile, fp32 accumulation. Traffic from memory is the compressed weight
(1.125 bytes per bf16 weight instead of 2) plus x; the repeated loads of the same value/meta word by
neighbouring lanes hit L1. That halves a decode GEMV's DRAM traffic, which is its whole cost; for
larger batches the tensor-core path of torch's semi-structured tensors is used instead.
Under TRITON_INTERPRET=1 tl.dot on bf16 is wrong in triton 3.9, so both operands are upcast to fp32
there (INTERPRET); on GPU the dot stays in the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmsqueeze.kernels.triton import INTERPRET


@triton.jit
def _sparse24_matmul_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_vn, stride_mn, stride_ym,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K  # K is a multiple of 16, so whole groups and meta words are in or out together
        g = rk // 4
        wk_ok = n_ok[:, None] & k_ok[None, :]
        word = tl.load(meta_ptr + rn[:, None] * stride_mn + (rk // 16)[None, :], mask=wk_ok, other=0)
        code = (word.to(tl.int32) >> ((g % 4) * 4)[None, :]) & 15
        r = (rk % 4)[None, :]
        v0 = tl.load(values_ptr + rn[:, None] * stride_vn + (2 * g)[None, :], mask=wk_ok & (r == (code & 3)),
                     other=0.0)
        v1 = tl.load(values_ptr + rn[:, None] * stride_vn + (2 * g + 1)[None, :], mask=wk_ok & (r == (code >> 2)),
                     other=0.0)
        w = v0 + v1  # at most one of the two is loaded at each (n, k); the other reads as 0
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")  # fp32 stays fp32 (no TF32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def sparse24_matmul_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K], values [N, K/2], meta [N, K/16] int16 (checked by the dispatcher) -> y [M, N] in x's dtype."""
    M, K = x.shape
    N = values.shape[0]
    values = values if values.stride(1) == 1 else values.contiguous()
    meta = meta if meta.stride(1) == 1 else meta.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    BLOCK_M = 16  # tl.dot's smallest tile; decode batches of 1..16 use one row block
    BLOCK_N, BLOCK_K = 64, 64
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _sparse24_matmul_kernel[grid](
        x, values, meta, bias if bias is not None else values, y,
        M, N, K,
        x.stride(0), x.stride(1), values.stride(0), meta.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, UPCAST=INTERPRET or x.dtype == torch.float32,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return y
