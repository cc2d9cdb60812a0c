"""Round to nearest on GPTQ's min/max grid per group: the data-free baseline every quantizer is measured against."""
from __future__ import annotations

import torch

from lmsqueeze.compressor.config import RTNConfig
from lmsqueeze.compressor.methods import LayerResult, register
from lmsqueeze.kernels import quantize_rtn
from lmsqueeze.kernels.obs import quantize_rtn_grid


def rtn(W: torch.Tensor, cfg: RTNConfig, keep_grid: bool = False) -> LayerResult:
    """W [out, in] -> quantized fp32 weights and (keep_grid) the QuantGrid."""
    if keep_grid:
        Wq, grid = quantize_rtn_grid(W.float(), cfg.quant_spec())
        return LayerResult(Wq, None, grid=grid)
    return LayerResult(quantize_rtn(W.float(), cfg.quant_spec()), None)


register("rtn", RTNConfig, kind="quantize", needs=(),
         solve=lambda W, stats, cfg, keep_grid: rtn(W, cfg, keep_grid),
         summary="round to nearest (data-free)")
