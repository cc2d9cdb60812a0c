"""Squared column norms in Triton.

Program (i, k) owns columns [i*BLOCK_D, (i+1)*BLOCK_D) and row split k; it streams its rows in
tiles of BLOCK_T, applies the padding mask in the load (masked rows read as 0) and writes one fp32
partial row. The split keeps a narrow layer (d = 576 -> 5 column blocks) busy on a GPU; partials
are summed once on the host, deterministically (no atomics). Traffic: one read of x, d*SPLITS*4
bytes written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _col_sq_norm_partial_kernel(
    x_ptr, mask_ptr, partial_ptr,
    rows, d, rows_per_split,
    stride_xt, stride_xd,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, rows)
    for t0 in range(start, stop, BLOCK_T):
        r = t0 + tl.arange(0, BLOCK_T)
        row_ok = r < stop
        if HAS_MASK:
            row_ok = row_ok & (tl.load(mask_ptr + r, mask=row_ok, other=0) != 0)
        v = tl.load(x_ptr + r[:, None] * stride_xt + cols[None, :] * stride_xd,
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v * v, axis=0)
    tl.store(partial_ptr + pid_s * d + cols, acc, mask=col_ok)


def col_sq_norm_update_triton(s: torch.Tensor, x: torch.Tensor, nsamples: int, mask: torch.Tensor | None = None) -> int:
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
    BLOCK_D, BLOCK_T = 128, 32
    splits = max(1, min(64, rows // 1024))
    rows_per_split = triton.cdiv(rows, splits)
    partial = torch.empty((splits, d), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(d, BLOCK_D), splits)
    _col_sq_norm_partial_kernel[grid](
        x2, m8 if m8 is not None else x2, partial,
        rows, d, rows_per_split,
        x2.stride(0), x2.stride(1),
        HAS_MASK=m8 is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D,
    )
    s.mul_(nsamples / (nsamples + m)).add_(partial.sum(dim=0), alpha=1.0 / (nsamples + m))
    return nsamples + m
