"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"): blocked OBS pruning with weight update; with `bits`, jointly quantized (the zeros stay exact).

Statistic: the Hessian H = 2 X^T X / n of the layer's inputs ([in, in] fp32).
"""
from __future__ import annotations

import torch

from lmsqueeze.compressor.config import SparseGPTConfig
from lmsqueeze.compressor.methods import LayerResult, prepare_hessian, register
from lmsqueeze.kernels import obs_update


def sparsegpt(W: torch.Tensor, H: torch.Tensor, cfg: SparseGPTConfig, keep_grid: bool = False) -> LayerResult:
    """W [out, in], H [in, in] -> pruned (and with cfg.bits, quantized) fp32 weights, KEEP mask, OBS loss."""
    cfg.check_width(W.shape[1], "this layer")
    W, Hinv, pd, ndead = prepare_hessian(W, H, cfg.percdamp)
    quant = cfg.quant_spec()
    Wn, keep, losses, *grid = obs_update(W, Hinv, blocksize=cfg.blocksize, prune=cfg.prune_spec(), quant=quant,
                                         return_grid=keep_grid and quant is not None)
    return LayerResult(Wn, keep, float(losses.sum()), pd, ndead, grid=grid[0] if grid else None)


register("sparsegpt", SparseGPTConfig, kind="both", needs=("hessian",),
         solve=lambda W, stats, cfg, keep_grid: sparsegpt(W, stats["hessian"], cfg, keep_grid),
         summary="OBS pruning with weight update (with --bits: joint sparse + quantized)")
