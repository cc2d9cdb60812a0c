"""NF4: 4-bit NormalFloat with a per-block absmax (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs").

Each block of `block_size` consecutive weights along a row's input dimension is divided by its absmax m
and rounded to the nearest of 16 levels placed at quantiles of the standard normal distribution (an
exact zero included, the extremes at -1 and 1); the weight becomes level * m. With double quantization
the fp32 absmaxes are themselves quantized: their mean c is subtracted and each block of `dq_block_size`
absmaxes is stored as 8-bit codes with its own absmax (linear, symmetric codes here; the paper uses an
8-bit float code book), and the weights are reconstructed with those absmaxes.

What it stores: lmsqueeze writes the dequantized weights (level * m, dense; there is no packed NF4 format in
the checkpoint formats transformers reads). How to deploy: load the checkpoint with bitsandbytes,
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`: when the input width is a multiple of
64 (bitsandbytes' block size; it cuts the flattened weight into blocks of 64), its blocks are these blocks,
its 16 levels are these (equal within 2e-7), and each block's largest weight is exactly +-m, so
re-quantizing yields the same codes and absmaxes (up to the rounding of the dense weights to the model
dtype). With double_quant, bnb_4bit_use_double_quant=True stores the absmaxes with its own 8-bit code, so
the deployed absmaxes differ slightly from the ones evaluated here. Evaluated on CPU as the dequantized
weights (weights only; activations stay in the model dtype); the embeddings and the output head stay
dense, as bitsandbytes keeps them. Data-free.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lmsqueeze.compressor.config import _Config
from lmsqueeze.compressor.methods import LayerResult, register
from lmsqueeze.errors import LmsqueezeError


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels [16] fp32, ascending: 8 quantiles of N(0, 1) above zero, 7 below, and 0, scaled to
    [-1, 1]. The outermost quantile sits at the middle of the tail probabilities 1 - 1/(2*15) and 1 - 1/(2*16)
    (the paper's offset, so that the extremes are finite and the two halves have 8 and 7 levels)."""
    offset = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    p = torch.tensor(offset, dtype=torch.float64)
    pos = torch.special.ndtri(torch.linspace(float(p), 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(float(p), 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (levels / levels.max()).float()


@dataclass(frozen=True)
class NF4Config(_Config):
    """block_size weights per absmax (64 as in QLoRA); double_quant: 8-bit absmaxes in blocks of dq_block_size."""

    block_size: int = 64
    double_quant: bool = False
    dq_block_size: int = 256
    method = "nf4"

    def __post_init__(self):
        super().__post_init__()
        for name in ("block_size", "dq_block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LmsqueezeError(f"nf4 {name} {v!r} is invalid; valid: an integer >= 1")

    def describe(self) -> str:
        return f"nf4 b{self.block_size}" + (" double-quant" if self.double_quant else "")


def _double_quantize(absmax: torch.Tensor, block: int) -> torch.Tensor:
    """absmax [n] fp32 -> its reconstruction after 8-bit codes per block (mean removed), [n] fp32."""
    c = absmax.mean()
    centred = absmax - c
    pad = (-centred.numel()) % block
    blocks = torch.nn.functional.pad(centred, (0, pad)).reshape(-1, block)
    m2 = blocks.abs().amax(1, keepdim=True)
    step = torch.where(m2 > 0, m2 / 127, torch.ones_like(m2))
    codes = torch.clamp(torch.round(blocks / step), -127, 127)
    return (codes * step).reshape(-1)[:absmax.numel()] + c


def nf4(W: torch.Tensor, cfg: NF4Config) -> LayerResult:
    """W [out, in] -> dequantized NF4 weights fp32 [out, in]; info: the mean absolute change of the absmaxes
    under double quantization (0 without it)."""
    W = W.float()
    out, cols = W.shape
    bs = cfg.block_size
    pad = (-cols) % bs
    blocks = torch.nn.functional.pad(W, (0, pad)).reshape(out, -1, bs)     # a row's last block zero-padded
    absmax = blocks.abs().amax(-1)                                        # [out, nblocks]
    levels = nf4_levels().to(W.device)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.bucketize((blocks / safe[..., None]).contiguous(), (levels[1:] + levels[:-1]) / 2)  # nearest
    stored = absmax
    if cfg.double_quant:
        stored = _double_quantize(absmax.reshape(-1), cfg.dq_block_size).reshape(absmax.shape)
    Wq = (levels[codes] * stored[..., None]).reshape(out, -1)[:, :cols]
    info = {"absmax_change": float((stored - absmax).abs().mean())}
    return LayerResult(Wq, None, info=info)


register("nf4", NF4Config, kind="quantize", needs=(),
         solve=lambda W, stats, cfg, keep_grid: nf4(W, cfg),
         summary="4-bit NormalFloat, absmax per block of 64 (data-free)")
