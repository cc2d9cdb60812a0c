"""LLM.int8() as a weight transform (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale").

LLM.int8 multiplies in int8 except for the outlier feature dimensions: input columns j where some
activation has |x_j| > threshold (6.0 in the paper) go through a 16-bit matmul. As a weight transform:
the weight columns of outlier inputs (max |x_j| over the calibration tokens above `threshold`) stay
exactly as they are, and every other weight is rounded to int8 with one absmax scale per output row
(vector-wise quantization: scale_r = max |W_rj| over the non-outlier columns / 127).

What it stores: the dequantized weights (dense; outlier columns bit for bit the original). Evaluated on
CPU with the activations left in the model dtype (the paper also quantizes the activations of the
non-outlier columns per token; that part is not simulated). How to deploy: bitsandbytes'
`BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)` on the dense checkpoint picks its outlier
columns at run time from the live activations with the same threshold and re-quantizes the other
columns per row, as here. Statistic: act_absmax [in].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmsqueeze.compressor.config import _Config
from lmsqueeze.compressor.methods import LayerResult, register
from lmsqueeze.errors import LmsqueezeError


@dataclass(frozen=True)
class LLMInt8Config(_Config):
    """threshold: an input column whose max |activation| exceeds it keeps its weights in 16-bit (paper: 6.0)."""

    threshold: float = 6.0
    method = "llm-int8"

    def __post_init__(self):
        super().__post_init__()
        if not float(self.threshold) > 0:
            raise LmsqueezeError(f"llm-int8 threshold {self.threshold} is invalid; valid: > 0 (default 6.0)")

    def describe(self) -> str:
        return f"llm-int8 t{self.threshold:g}"


def llm_int8(W: torch.Tensor, act_absmax: torch.Tensor, cfg: LLMInt8Config) -> LayerResult:
    """W [out, in], act_absmax [in] -> fp32 weights [out, in]: outlier columns exact, the rest int8 per row.
    info: the number and share of outlier columns."""
    W = W.float()
    outlier = act_absmax.to(W.device) > cfg.threshold                     # [in] bool
    regular = W.masked_fill(outlier[None, :], 0.0)
    scale = regular.abs().amax(1, keepdim=True) / 127                    # [out, 1]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(regular / scale), -127, 127) * scale
    Wq = torch.where(outlier[None, :], W, q)
    n = int(outlier.sum())
    return LayerResult(Wq, None, info={"outlier_columns": n, "outlier_share": n / W.shape[1]})


register("llm-int8", LLMInt8Config, kind="quantize", needs=("act_absmax",),
         solve=lambda W, stats, cfg, keep_grid: llm_int8(W, stats["act_absmax"], cfg),
         summary="int8 per row, outlier input columns (|x| > 6) kept in 16-bit")
