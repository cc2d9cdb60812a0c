"""Magnitude pruning: drop the smallest |W|, over the whole layer or within each output row, or N:M.

Data-free (no statistic). The baseline every calibrated pruner is measured against (Han et al. 2015).
"""
from __future__ import annotations

import torch

from lmsqueeze.compressor.config import MagnitudeConfig
from lmsqueeze.compressor.methods import LayerResult, keep_from_scores, register


def magnitude(W: torch.Tensor, cfg: MagnitudeConfig) -> LayerResult:
    """W [out, in] -> pruned fp32 weights and KEEP mask; exactly round(s * numel) (or N of every M) kept out."""
    W = W.float()
    cfg.check_width(W.shape[1], "this layer")
    keep = keep_from_scores(W.abs(), cfg, per_row=cfg.scope == "row")
    return LayerResult(W.masked_fill(~keep, 0.0), keep)


register("magnitude", MagnitudeConfig, kind="prune", needs=(),
         solve=lambda W, stats, cfg, keep_grid: magnitude(W, cfg),
         summary="prune the smallest |W| (data-free)")
