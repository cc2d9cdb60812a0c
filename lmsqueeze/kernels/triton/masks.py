"""KEEP masks in Triton: row-wise exact count and N:M, optionally fused with the Wanda score.

Scores become order-preserving int32 keys (float bits; negative floats get their magnitude bits
flipped; -0 counts as +0; every NaN is the largest key), so "lower score first, lower column
first among equals" is integer order on (key, column), exactly the reference's stable sort.

- Row-wise (one program per row): the k-th smallest key T by a 32-step binary search on the key
  value; each step streams the row in BLOCK_C slabs and counts keys <= mid (the row sits in L1/L2
  after the first pass, so a step costs about one L2 read of the row). Then one pass writes the
  mask: prune key < T, and of the keys equal to T the first (k - #(key < T)) by column, found with a
  running tl.cumsum. No sort, exact count, deterministic ties.
- N:M (a block of groups per program): each lane's rank inside its group from an [M, M]
  comparison; keep the lanes ranked >= M - N.
- Fused Wanda: the key of |W_ij| * sqrt(norm_j) is computed in the load; the [out, in] score matrix
  is never written (sqrt(norm) is taken once on the host, the same fp32 sqrt the reference uses).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _keys(x_ptr, sq_ptr, row, cols, ok, stride_r, stride_c, HAS_SQ: tl.constexpr):
    v = tl.load(x_ptr + row * stride_r + cols * stride_c, mask=ok, other=0.0).to(tl.float32)
    if HAS_SQ:
        v = tl.abs(v) * tl.load(sq_ptr + cols, mask=ok, other=0.0)
    u = v.to(tl.int32, bitcast=True)
    u = tl.where(u == -2147483648, 0, u)
    u = tl.where(u < 0, u ^ 0x7FFFFFFF, u)
    return tl.where(v != v, 2147483647, u).to(tl.int64)  # every NaN last, as in torch.sort


@triton.jit
def _rowwise_kernel(
    x_ptr, sq_ptr, keep_ptr,
    cols, k,
    stride_r, stride_c, stride_kr,
    HAS_SQ: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):  # the key range has 2^32 values: 32 halvings leave one
        mid = lo + (hi - lo) // 2
        cnt = tl.full([], 0, tl.int64)
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            ok = c < cols
            key = _keys(x_ptr, sq_ptr, row, c, ok, stride_r, stride_c, HAS_SQ)
            cnt += tl.sum((ok & (key <= mid)).to(tl.int64), axis=0)
        hi = tl.where(cnt >= k, mid, hi)
        lo = tl.where(cnt >= k, lo, mid + 1)
    t = lo
    less = tl.full([], 0, tl.int64)
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = c < cols
        key = _keys(x_ptr, sq_ptr, row, c, ok, stride_r, stride_c, HAS_SQ)
        less += tl.sum((ok & (key < t)).to(tl.int64), axis=0)
    need = k - less  # how many of the keys equal to t are pruned, lowest columns first
    seen = tl.full([], 0, tl.int64)
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ok = c < cols
        key = _keys(x_ptr, sq_ptr, row, c, ok, stride_r, stride_c, HAS_SQ)
        eq = (ok & (key == t)).to(tl.int64)
        order = tl.cumsum(eq, axis=0) + seen
        pruned = (key < t) | ((eq != 0) & (order <= need))
        tl.store(keep_ptr + row * stride_kr + c, (~pruned).to(tl.uint8), mask=ok)
        seen += tl.sum(eq, axis=0)


@triton.jit
def _nm_kernel(
    x_ptr, sq_ptr, keep_ptr,
    groups, groups_per_row,
    stride_r, stride_c, stride_kr,
    N: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, HAS_SQ: tl.constexpr, BLOCK_G: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    lane = tl.arange(0, MP)
    row = g // groups_per_row
    cols = (g % groups_per_row)[:, None] * M + lane[None, :]                  # [BLOCK_G, MP]
    ok = (g < groups)[:, None] & (lane < M)[None, :]
    key = _keys(x_ptr, sq_ptr, row[:, None], cols, ok, stride_r, stride_c, HAS_SQ)
    ki = key[:, :, None]
    kj = key[:, None, :]
    first = lane[None, None, :] < lane[None, :, None]                          # partner j before i
    lower = ((kj < ki) | ((kj == ki) & first)) & (lane < M)[None, None, :]
    rank = tl.sum(lower.to(tl.int32), axis=2)                                  # [BLOCK_G, MP]
    tl.store(keep_ptr + row[:, None] * stride_kr + cols, (rank >= M - N).to(tl.uint8), mask=ok)


def mask_triton(x: torch.Tensor, col_sq_norm: torch.Tensor | None, k: int = -1, n: int = 0, m: int = 0) -> torch.Tensor:
    """KEEP mask of x [rows, cols]: row-wise with k pruned per row (k >= 0) or N:M (k < 0).

    col_sq_norm [cols]: when given, the scores are Wanda's |x| * sqrt(col_sq_norm).
    """
    rows, cols = x.shape
    if k == 0 or x.numel() == 0:
        return torch.ones(rows, cols, dtype=torch.bool, device=x.device)
    if k >= cols:  # round(sparsity * cols) can reach cols on a very short row
        return torch.zeros(rows, cols, dtype=torch.bool, device=x.device)
    sq = col_sq_norm.to(torch.float32).sqrt().contiguous() if col_sq_norm is not None else x
    keep = torch.empty(rows, cols, dtype=torch.uint8, device=x.device)
    if k > 0:
        BLOCK_C = min(1024, triton.next_power_of_2(cols))
        _rowwise_kernel[(rows,)](
            x, sq, keep, cols, k, x.stride(0), x.stride(1), keep.stride(0),
            HAS_SQ=col_sq_norm is not None, BLOCK_C=BLOCK_C,
        )
    else:
        groups_per_row = cols // m
        groups = rows * groups_per_row
        BLOCK_G = 64
        _nm_kernel[(triton.cdiv(groups, BLOCK_G),)](
            x, sq, keep, groups, groups_per_row, x.stride(0), x.stride(1), keep.stride(0),
            N=n, M=m, MP=triton.next_power_of_2(m), HAS_SQ=col_sq_norm is not None, BLOCK_G=BLOCK_G,
        )
    return keep.view(torch.bool)
