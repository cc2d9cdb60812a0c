"""Low-bit (and 2:4 + 4-bit) weight matmul in Triton: y [M, N] = x [M, K] @ W.T + bias, W packed.

Formats: lmsqueeze/kernels/quant.py. Program (i, j) owns output columns [j*BLOCK_N, (j+1)*BLOCK_N)
and rows [i*BLOCK_M, ...). For each BLOCK_K slab of the (packed-order) input dimension it loads the
packed words and rebuilds the weight tile in registers:

    dense:  q = (qweight[n, k // P] >> (bits * (k % P))) & maxq       P = 32 / bits codes a word
            W[n, k] = scales[n, k // gs] * (q - zeros[n, k // gs])
            x is read through perm (act-order): x[m, perm[k]]
    2:4:    c = (meta[n, k // 16] >> 4 * ((k // 4) % 4)) & 15,  r = k % 4
            v = 2 * (k // 4) + (r == i1(c))  if r is i0(c) or i1(c), else W[n, k] = 0
            W[n, k] = scales[n, g] * (((qvalues[n, v // 8] >> 4 * (v % 8)) & 15) - zeros[n, g])

then one tl.dot with the x tile, fp32 accumulation. From memory come only the packed bytes (0.54
or 0.41 bytes a weight instead of 2 for bf16) and x; neighbouring lanes that read the same word,
scale or meta hit L1. That is the whole cost of a decode GEMV. Under TRITON_INTERPRET=1 tl.dot on
bf16 is wrong in triton 3.9, so operands are upcast to fp32 there (INTERPRET), as in sparse24.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmsqueeze.kernels.triton import INTERPRET


@triton.jit
def _quant_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, y_ptr,
    M, N, K, G,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_ym,
    BITS: tl.constexpr, GS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PER: tl.constexpr = 32 // BITS
    MAXQ: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        wk_ok = n_ok[:, None] & k_ok[None, :]
        word = tl.load(qw_ptr + rn[:, None] * stride_qn + (rk // PER)[None, :], mask=wk_ok, other=0)
        q = (word >> ((rk % PER) * BITS)[None, :]) & MAXQ
        g = rk // GS
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=wk_ok, other=0.0)
        z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=wk_ok, other=0)
        w = (q - z.to(tl.int32)).to(tl.float32) * s
        if HAS_PERM:
            xk = tl.load(perm_ptr + rk, mask=k_ok, other=0)
        else:
            xk = rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + xk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        else:
            w = w.to(x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sparse24_quant_matmul_kernel(
    x_ptr, qv_ptr, meta_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_qn, stride_mn, stride_sn, stride_ym,
    GS: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
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
        k_ok = rk < K  # K is a multiple of 16: whole groups and meta words are in or out together
        wk_ok = n_ok[:, None] & k_ok[None, :]
        grp4 = rk // 4
        mword = tl.load(meta_ptr + rn[:, None] * stride_mn + (rk // 16)[None, :], mask=wk_ok, other=0)
        code = (mword.to(tl.int32) >> ((grp4 % 4) * 4)[None, :]) & 15
        r = (rk % 4)[None, :]
        i0 = code & 3
        i1 = code >> 2
        kept = (r == i0) | (r == i1)
        v = 2 * grp4[None, :] + (r == i1).to(tl.int32)                       # value index of (n, k)
        word = tl.load(qv_ptr + rn[:, None] * stride_qn + v // 8, mask=wk_ok & kept, other=0)
        q = (word >> ((v % 8) * 4)) & 15
        g = rk // GS
        s = tl.load(s_ptr + rn[:, None] * stride_sn + g[None, :], mask=wk_ok, other=0.0)
        z = tl.load(z_ptr + rn[:, None] * stride_sn + g[None, :], mask=wk_ok, other=0)
        w = tl.where(kept, (q - z.to(tl.int32)).to(tl.float32) * s, 0.0)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        else:
            w = w.to(x.dtype)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


_BLOCK_M, _BLOCK_N, _BLOCK_K = 16, 64, 64  # tl.dot's smallest M tile; decode batches use one row block


def quant_matmul_triton(x: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (checked by the dispatcher), packed QuantWeight -> y [M, N] in x's dtype."""
    M, K = x.shape
    N = packed.out_features
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    qw, s, z = packed.qweight.contiguous(), packed.scales.contiguous(), packed.zeros.contiguous()
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(N, _BLOCK_N))
    _quant_matmul_kernel[grid](
        x, qw, s, z, packed.perm if packed.perm is not None else qw, bias if bias is not None else s, y,
        M, N, K, s.shape[1],
        x.stride(0), x.stride(1), qw.stride(0), s.stride(0), y.stride(0),
        BITS=packed.bits, GS=packed.group_size, HAS_PERM=packed.perm is not None, HAS_BIAS=bias is not None,
        UPCAST=INTERPRET or x.dtype == torch.float32,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
    )
    return y


def sparse24_quant_matmul_triton(x: torch.Tensor, packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (checked by the dispatcher), packed Sparse24QuantWeight -> y [M, N] in x's dtype."""
    M, K = x.shape
    N = packed.out_features
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    qv, meta = packed.qvalues.contiguous(), packed.meta.contiguous()
    s, z = packed.scales.contiguous(), packed.zeros.contiguous()
    grid = (triton.cdiv(M, _BLOCK_M), triton.cdiv(N, _BLOCK_N))
    _sparse24_quant_matmul_kernel[grid](
        x, qv, meta, s, z, bias if bias is not None else s, y,
        M, N, K,
        x.stride(0), x.stride(1), qv.stride(0), meta.stride(0), s.stride(0), y.stride(0),
        GS=packed.group_size, HAS_BIAS=bias is not None, UPCAST=INTERPRET or x.dtype == torch.float32,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K,
    )
    return y
