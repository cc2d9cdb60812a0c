"""LLM.int8() as a weight transform (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale").

LLM.int8 multiplies in int8 except for the outlier feature dimensions: input columns j where some
activation has |x_j| > threshold (6.0 in the paper) go through a 16-bit matmul. As a weight transform:
the weight columns of outlier inputs (max |x_j| over the calibration tokens above `threshold`) stay
exactly as they are, and every other weight is rounded to int8 with one absmax scale per output row
(vector-wise quantization: scale_r = max |W_rj| over the non-outlier columns / 127).

What it stores: the dequantized weights in a dense checkpoint (outlier columns bit for bit the original, the
others int8 code * row scale); lmsqueeze writes no int8 format, and `lmsqueeze.json` records per module how
many columns were outliers. The outlier columns are fixed by the calibration data, and the activations stay
in the model dtype (the paper also rounds the non-outlier activations to int8 per token; not simulated).

How to deploy: the dense checkpoint runs as is anywhere transformers does (the numbers lmsqueeze measured,
no memory saved). For the memory saving, load the *base* model with bitsandbytes,
`BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)`; that is LLM.int8 at run time, with three
differences from what was measured here: it picks the outlier columns per batch from the live activations;
it rounds the non-outlier activations to int8; and in inference mode (has_fp16_weights=False) it stores
every weight column in int8, with one absmax per row over all columns, and multiplies the 16-bit outlier
activations with those dequantized int8 weights, so its outlier columns are not exact and its row scales
are coarser wherever the row's largest weight sits in an outlier column. Loading this module's output into
bitsandbytes re-quantizes it that way too: its int8 grid is not preserved. Expect bitsandbytes to be
slightly worse than these numbers. Statistic: act_absmax [in].
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
