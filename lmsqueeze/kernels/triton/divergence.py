"""Per-token KL(P||Q), KL(Q||P), JSD and top-1 agreement in Triton.

Program i owns rows [i*BLOCK_R, (i+1)*BLOCK_R) and streams over the vocabulary in tiles of
BLOCK_V, twice:
  pass 1: online max and sum-exp of both logit rows (the running sum is rescaled by exp(m_old - m_new)
          when the max grows), plus the running argmax of each -> log Z_p, log Z_q, top-1;
  pass 2: with log p = x - log Z_p and log q = y - log Z_q known per element,
          KL(P||Q) += sum p (log p - log q), KL(Q||P) += sum q (log q - log p),
          JSD += 1/2 sum [p (log p - log m) + q (log q - log m)], log m = logaddexp(log p, log q) - ln 2.
Everything is fp32 in registers; nothing of size [rows, V] is written. Traffic: the two logit
tensors are read twice (2 x 2 x rows x V x bytes), 13 bytes per row written. A single pass would
do for the KLs (E_p[x - y] rescales online) but not for JSD, whose log m needs both normalisers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_LN2 = 0.6931471805599453


@triton.jit
def _token_divergence_kernel(
    p_ptr, q_ptr, klpq_ptr, klqp_ptr, jsd_ptr, top1_ptr,
    rows, vocab,
    stride_pr, stride_pv, stride_qr, stride_qv,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    neg_inf = float("-inf")
    mx = tl.full([BLOCK_R], neg_inf, tl.float32)
    my = tl.full([BLOCK_R], neg_inf, tl.float32)
    sx = tl.zeros([BLOCK_R], tl.float32)
    sy = tl.zeros([BLOCK_R], tl.float32)
    ax = tl.zeros([BLOCK_R], tl.int32)
    ay = tl.zeros([BLOCK_R], tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (v < vocab)[None, :]
        x = tl.load(p_ptr + r[:, None] * stride_pr + v[None, :] * stride_pv, mask=ok, other=neg_inf).to(tl.float32)
        y = tl.load(q_ptr + r[:, None] * stride_qr + v[None, :] * stride_qv, mask=ok, other=neg_inf).to(tl.float32)
        tx = tl.max(x, axis=1)
        ty = tl.max(y, axis=1)
        # strict > keeps the first index of a tie, as torch.argmax does
        ax = tl.where(tx > mx, v0 + tl.argmax(x, axis=1).to(tl.int32), ax)
        ay = tl.where(ty > my, v0 + tl.argmax(y, axis=1).to(tl.int32), ay)
        nx = tl.maximum(mx, tx)
        ny = tl.maximum(my, ty)
        nx_safe = tl.where(nx == neg_inf, 0.0, nx)
        ny_safe = tl.where(ny == neg_inf, 0.0, ny)
        sx = sx * tl.exp(mx - nx_safe) + tl.sum(tl.exp(x - nx_safe[:, None]), axis=1)
        sy = sy * tl.exp(my - ny_safe) + tl.sum(tl.exp(y - ny_safe[:, None]), axis=1)
        mx = nx
        my = ny
    # rows past the end read as -inf everywhere; give them a finite normaliser (their results are not stored)
    lzx = tl.where(row_ok, mx + tl.log(tl.where(row_ok, sx, 1.0)), 0.0)
    lzy = tl.where(row_ok, my + tl.log(tl.where(row_ok, sy, 1.0)), 0.0)
    kl_pq = tl.zeros([BLOCK_R], tl.float32)
    kl_qp = tl.zeros([BLOCK_R], tl.float32)
    jsd = tl.zeros([BLOCK_R], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (v < vocab)[None, :]
        x = tl.load(p_ptr + r[:, None] * stride_pr + v[None, :] * stride_pv, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(q_ptr + r[:, None] * stride_qr + v[None, :] * stride_qv, mask=ok, other=0.0).to(tl.float32)
        lp = x - lzx[:, None]
        lq = y - lzy[:, None]
        p = tl.exp(lp)
        q = tl.exp(lq)
        d = lp - lq
        hi = tl.maximum(lp, lq)
        lm = hi + tl.log(1.0 + tl.exp(-tl.abs(d))) - _LN2
        kl_pq += tl.sum(tl.where(ok, p * d, 0.0), axis=1)
        kl_qp += tl.sum(tl.where(ok, -q * d, 0.0), axis=1)
        jsd += tl.sum(tl.where(ok, p * (lp - lm) + q * (lq - lm), 0.0), axis=1)
    tl.store(klpq_ptr + r, tl.maximum(kl_pq, 0.0), mask=row_ok)
    tl.store(klqp_ptr + r, tl.maximum(kl_qp, 0.0), mask=row_ok)
    tl.store(jsd_ptr + r, tl.minimum(tl.maximum(0.5 * jsd, 0.0), _LN2), mask=row_ok)
    tl.store(top1_ptr + r, (ax == ay).to(tl.int8), mask=row_ok)


def token_divergence_triton(p: torch.Tensor, q: torch.Tensor):
    """p, q: [rows, V] logits (fp32/bf16/fp16, any strides). Returns kl_pq, kl_qp, jsd (fp32 [rows]), top1 (bool)."""
    if p.dim() != 2 or p.shape != q.shape:
        raise ValueError(f"expected two [rows, V] tensors of one shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    rows, vocab = p.shape
    out = [torch.empty(rows, dtype=torch.float32, device=p.device) for _ in range(3)]
    top1 = torch.empty(rows, dtype=torch.int8, device=p.device)
    if rows == 0:
        return (*out, top1.bool())
    BLOCK_R = 4
    BLOCK_V = min(1024, triton.next_power_of_2(vocab))
    grid = (triton.cdiv(rows, BLOCK_R),)
    _token_divergence_kernel[grid](
        p, q, out[0], out[1], out[2], top1,
        rows, vocab,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V,
    )
    return (*out, top1.bool())
