"""The blocked OBS sweep (SparseGPT / GPTQ) in Triton: one launch per block of columns.

Contract: lmsqueeze.kernels.obs.obs_update_ref. Per block [i1, i2) of `bs` columns:

- host (torch), unstructured pruning only: the block's keep mask, chosen exactly as the reference
  does (w^2 / Hinv[j, j]^2 over the whole block, stable sort, the k smallest go). It needs every row
  of the block, so it cannot live in a program that owns a row tile;
- one launch, grid = cdiv(rows, BLOCK_R): program p holds rows [p*BLOCK_R, (p+1)*BLOCK_R) of the
  block as a [BLOCK_R, BS] fp32 tile in registers and sweeps its columns in order. Column i is
  taken out of the tile with a where+sum (registers cannot be indexed), N:M masks are chosen every
  m columns by ranking the m saliencies (ties to the lower column, as a stable sort), a quant group's
  scale/zero come from the tile (and, for a group reaching past the block, from W in memory, which
  holds the right not-yet-updated values), then q, err = (w - q) / d and the rank-1 update
  tile -= err * Hinv[i, :] (columns <= i are dead by then, so the update runs over the whole row of
  the tile). Q, Err1, the mask and the losses are written once at the end;
- host: W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:], one torch.matmul (cuBLAS is already good at it).

Traffic per block: the [rows, bs] slice of W read once and written once, Err1 written once, Hinv's
[bs, bs] block read by every program (L2-resident); the published loop instead launches about ten
kernels per column, each reading the [rows, <= bs] block again.

What ships and why: this fused kernel. The issue allows per-column kernels captured in a CUDA graph
as a stepping stone until the fused kernel is faster, but no GPU was available to this work, so
nothing here has been timed on one and no GPU number is claimed; the fused kernel is the one with
the lower memory traffic and launch count (one launch per block instead of ~10 per column), and it
is tested for correctness against the reference under TRITON_INTERPRET=1. Timing it against a
graph-captured per-column version on a GPU is open work.

Under the interpreter every op is an IEEE fp32 numpy op without FMA contraction, like the
reference; on a GPU the compiler may fuse the rank-1 update into FMAs, which changes only the last
bit of the rounding (the tolerance in tests/kernels/test_obs_fast.py covers it; a quantization
decision sitting exactly on a rounding boundary may then flip, as with any reordering).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmsqueeze.kernels.obs import PruneSpec, QuantSpec, block_prune_counts, find_params


@triton.jit
def _round_half_even(x):
    # torch.round's rule without libdevice (which the interpreter lacks): adding and subtracting
    # 1.5 * 2^23 leaves x rounded to an integer, ties to even, for |x| < 2^22; larger |x| are
    # beyond any grid (maxq <= 255) and only need to stay large, which they do, for the clamp.
    big = 12582912.0
    return (x + big) - big


@triton.jit
def _obs_block_kernel(
    w_ptr, hb_ptr, keep_ptr, err_ptr, loss_ptr, scale_ptr, zero_ptr,
    rows, cols, i1, bs,
    stride_wr, stride_kr, stride_er,
    NM_N: tl.constexpr, NM_M: tl.constexpr, QUANT: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr,
    MAXQ: tl.constexpr, PRUNE: tl.constexpr, BLOCK_R: tl.constexpr, BS: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BS)
    row_ok = r < rows
    col_ok = c < bs
    ok = row_ok[:, None] & col_ok[None, :]
    tile = tl.load(w_ptr + r[:, None] * stride_wr + (i1 + c)[None, :], mask=ok, other=0.0)  # [BLOCK_R, BS]
    keep = tl.load(keep_ptr + r[:, None] * stride_kr + (i1 + c)[None, :], mask=ok, other=1).to(tl.int32)
    Q = tl.zeros([BLOCK_R, BS], dtype=tl.float32)
    E = tl.zeros([BLOCK_R, BS], dtype=tl.float32)
    loss = tl.zeros([BLOCK_R], dtype=tl.float32)
    scale = tl.load(scale_ptr + r, mask=row_ok, other=1.0)  # the current group's grid, carried over blocks
    zero = tl.load(zero_ptr + r, mask=row_ok, other=0.0)
    for i in range(0, bs):
        if NM_M > 0:
            if i % NM_M == 0:
                # rank each of the m columns by (saliency, column); the m - n lowest ranks are pruned
                for a in tl.static_range(NM_M):
                    wa = tl.sum(tl.where(c[None, :] == i + a, tile, 0.0), axis=1)
                    da = tl.load(hb_ptr + (i + a) * bs + (i + a))
                    sa = (wa * wa) / (da * da)
                    rank = tl.zeros([BLOCK_R], dtype=tl.int32)
                    for b in tl.static_range(NM_M):
                        wb = tl.sum(tl.where(c[None, :] == i + b, tile, 0.0), axis=1)
                        db = tl.load(hb_ptr + (i + b) * bs + (i + b))
                        sb = (wb * wb) / (db * db)
                        if b < a:
                            rank += (sb <= sa).to(tl.int32)
                        elif b > a:
                            rank += (sb < sa).to(tl.int32)
                    keep_a = (rank >= NM_M - NM_N).to(tl.int32)
                    keep = tl.where(c[None, :] == i + a, keep_a[:, None], keep)
        w = tl.sum(tl.where(c[None, :] == i, tile, 0.0), axis=1)  # [BLOCK_R], column i
        d = tl.load(hb_ptr + i * bs + i)
        q = w
        if QUANT:
            if GROUP > 0:
                if (i1 + i) % GROUP == 0:
                    in_grp = (c[None, :] >= i) & (c[None, :] < i + GROUP) & ok
                    xmin = tl.min(tl.where(in_grp, tile, float("inf")), axis=1)
                    xmax = tl.max(tl.where(in_grp, tile, float("-inf")), axis=1)
                    hi = tl.minimum(i1 + i + GROUP, cols)
                    for c0 in range(i1 + bs, hi, BS):  # the group reaches past the block: W in memory
                        cc = c0 + c
                        m2 = row_ok[:, None] & (cc < hi)[None, :]
                        v = tl.load(w_ptr + r[:, None] * stride_wr + cc[None, :], mask=m2, other=0.0)
                        xmin = tl.minimum(xmin, tl.min(tl.where(m2, v, float("inf")), axis=1))
                        xmax = tl.maximum(xmax, tl.max(tl.where(m2, v, float("-inf")), axis=1))
                    xmin = tl.minimum(xmin, 0.0)
                    xmax = tl.maximum(xmax, 0.0)
                    if SYM:
                        xmax = tl.maximum(tl.abs(xmin), xmax)
                        xmin = tl.where(xmin < 0, -xmax, xmin)
                    empty = (xmin == 0) & (xmax == 0)
                    xmin = tl.where(empty, -1.0, xmin)
                    xmax = tl.where(empty, 1.0, xmax)
                    scale = (xmax - xmin) / MAXQ
                    if SYM:
                        zero = tl.zeros([BLOCK_R], dtype=tl.float32) + (MAXQ + 1) / 2
                    else:
                        zero = _round_half_even(-xmin / scale)
            qi = _round_half_even(w / scale) + zero
            qi = tl.minimum(tl.maximum(qi, 0.0), MAXQ)
            q = scale * (qi - zero)
        if PRUNE:
            k = tl.sum(tl.where(c[None, :] == i, keep, 0), axis=1)
            q = tl.where(k != 0, q, 0.0)
        diff = w - q
        loss += ((diff * diff) / (d * d)) / 2.0
        err = diff / d
        h = tl.load(hb_ptr + i * bs + c, mask=col_ok & (c > i), other=0.0)  # Hinv1[i, :], zero up to i
        tile = tile - err[:, None] * h[None, :]
        Q = tl.where(c[None, :] == i, q[:, None], Q)
        E = tl.where(c[None, :] == i, err[:, None], E)
    tl.store(w_ptr + r[:, None] * stride_wr + (i1 + c)[None, :], Q, mask=ok)
    tl.store(err_ptr + r[:, None] * stride_er + c[None, :], E, mask=ok)
    tl.store(keep_ptr + r[:, None] * stride_kr + (i1 + c)[None, :], keep.to(tl.int8), mask=ok)
    tl.store(loss_ptr + r, tl.load(loss_ptr + r, mask=row_ok, other=0.0) + loss, mask=row_ok)
    tl.store(scale_ptr + r, scale, mask=row_ok)
    tl.store(zero_ptr + r, zero, mask=row_ok)


def obs_update_triton(W: torch.Tensor, Hinv: torch.Tensor, *, blocksize: int = 128, prune: PruneSpec | None = None,
                      quant: QuantSpec | None = None):
    """Same contract as obs_update_ref; arguments already checked by obs_update."""
    rows, cols = W.shape
    W = W.contiguous().clone()
    Hinv = Hinv.contiguous()
    keep = torch.ones((rows, cols), dtype=torch.int8, device=W.device)
    losses = torch.zeros(rows, dtype=torch.float32, device=W.device)
    if quant is not None and quant.group_size == -1:
        s, z = find_params(W, quant)
        scale, zero = s[:, 0].contiguous(), z[:, 0].contiguous()
    else:
        scale = torch.ones(rows, dtype=torch.float32, device=W.device)
        zero = torch.zeros(rows, dtype=torch.float32, device=W.device)
    unstructured = prune is not None and not prune.nm
    counts = block_prune_counts(prune.sparsity, rows, cols, blocksize) if unstructured else None
    BS = triton.next_power_of_2(min(blocksize, cols))
    BLOCK_R = 16
    grid = (triton.cdiv(rows, BLOCK_R),)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        bs = i2 - i1
        Hb = Hinv[i1:i2, i1:i2].contiguous()
        if unstructured and counts[b] > 0:
            tmp = W[:, i1:i2] ** 2 / torch.diag(Hb)[None, :] ** 2
            idx = torch.sort(tmp.flatten(), stable=True).indices[:counts[b]]
            blk = torch.ones(tmp.numel(), dtype=torch.int8, device=W.device)
            blk[idx] = 0
            keep[:, i1:i2] = blk.view(rows, bs)
        Err1 = torch.empty((rows, bs), dtype=torch.float32, device=W.device)
        _obs_block_kernel[grid](
            W, Hb, keep, Err1, losses, scale, zero,
            rows, cols, i1, bs,
            W.stride(0), keep.stride(0), Err1.stride(0),
            NM_N=prune.n if prune is not None and prune.nm else 0,
            NM_M=prune.m if prune is not None and prune.nm else 0,
            QUANT=quant is not None,
            GROUP=quant.group_size if quant is not None and quant.group_size != -1 else 0,
            SYM=bool(quant is not None and quant.sym),
            MAXQ=float(quant.maxq) if quant is not None else 1.0,
            PRUNE=prune is not None,
            BLOCK_R=BLOCK_R, BS=BS,
        )
        if i2 < cols:
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, (keep.bool() if prune is not None else None), losses
