"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): blocked OBS quantization onto the min/max grid per group, optional act-order.

Statistic: the Hessian H = 2 X^T X / n of the layer's inputs ([in, in] fp32).
"""
from __future__ import annotations

import torch

from lmsqueeze.compressor.config import GPTQConfig
from lmsqueeze.compressor.methods import LayerResult, prepare_hessian, register
from lmsqueeze.kernels import obs_update


def gptq(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig, keep_grid: bool = False) -> LayerResult:
    """W [out, in], H [in, in] -> quantized fp32 weights, OBS loss and (keep_grid) the QuantGrid."""
    perm = None
    if cfg.act_order:  # visit the inputs with the largest diag(H) first; groups are consecutive in that order
        perm = torch.argsort(torch.diag(H.float()), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    W, Hinv, pd, ndead = prepare_hessian(W, H, cfg.percdamp)
    Wn, _, losses, *grid = obs_update(W, Hinv, blocksize=cfg.blocksize, quant=cfg.quant_spec(), return_grid=keep_grid)
    grid = grid[0] if grid else None
    if perm is not None:
        Wn = Wn[:, torch.argsort(perm)]
        grid = grid.permuted(perm) if grid is not None else None
    return LayerResult(Wn, None, float(losses.sum()), pd, ndead, grid=grid)


register("gptq", GPTQConfig, kind="quantize", needs=("hessian",),
         solve=lambda W, stats, cfg, keep_grid: gptq(W, stats["hessian"], cfg, keep_grid),
         summary="OBS quantization with error feedback")
