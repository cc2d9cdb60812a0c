"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"): prune the
smallest |W_ij| * ||X_j||_2 within each output row (or each N:M group), no weight update.

Statistic: the running squared column norms of the inputs (col_sq_norm [in], mean over calibration tokens).
"""
from __future__ import annotations

import torch

from lmsqueeze.compressor.config import WandaConfig
from lmsqueeze.compressor.methods import LayerResult, register
from lmsqueeze.kernels import wanda_mask


def wanda(W: torch.Tensor, col_sq_norm: torch.Tensor, cfg: WandaConfig) -> LayerResult:
    """W [out, in], col_sq_norm [in] -> pruned fp32 weights and KEEP mask."""
    cfg.check_width(W.shape[1], "this layer")
    # fused: scores |W| * sqrt(col_sq_norm) are formed inside the mask kernel, never stored; W is
    # read in its own dtype (the kernel upcasts exactly, as the reference does), half the bytes of fp32
    nm = cfg.nm
    Wm = W if W.dtype in (torch.float32, torch.bfloat16, torch.float16) else W.float()
    keep = wanda_mask(Wm, col_sq_norm, n=nm[0], m=nm[1]) if nm else wanda_mask(Wm, col_sq_norm, sparsity=cfg.fraction)
    return LayerResult(W.float().masked_fill(~keep, 0.0), keep)


register("wanda", WandaConfig, kind="prune", needs=("col_sq_norm",),
         solve=lambda W, stats, cfg, keep_grid: wanda(W, stats["col_sq_norm"], cfg),
         summary="prune the smallest |W| * ||x|| per output row")
