"""AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration").

A few input channels carry large activations; their weights matter most. AWQ scales input channel j of
the weights up by s_j before group quantization and the input down by s_j, so that salient weights get a
finer effective grid: y = Q(W diag(s)) (diag(s)^-1 x). The scales are s = a^alpha / sqrt(max(a^alpha)
min(a^alpha)), a the mean |x_j| over the calibration tokens, with alpha chosen on a grid over [0, 1) to
minimise the output error of every module that reads this input (q/k/v together, gate/up together).

The output error of a weight error D over the calibration tokens is sum ||D x||^2 = tr(D H D^T) / 2 with
H = 2 X^T X / n, the Hessian the driver already collects: the search costs GEMMs on [in, in], not passes
over the activations. The optional clipping search then shrinks each (row, group)'s range by a factor in
[max_shrink, 1] (the paper's auto-clip), each group judged on its own block of H (scaled by 1/s).

Where the scale goes (the driver decides, lmsqueeze.compressor.driver._fold_rule): when the modules' input
comes straight out of a normalisation (input_layernorm before q/k/v; before gate/up, Llama's
post_attention_layernorm or Gemma 2/3's pre_feedforward_layernorm, the norm whose output they read; Gemma's
(1 + w) norms too), 1/s is folded into the norm's weight and the modules store Q(W diag(s)) exactly on the
group grid, so packed checkpoints (compressed-tensors, gptq) hold them. Elsewhere (o_proj, down_proj: their
input is computed, not produced by a module with a weight) the scale stays explicit: dense checkpoints
store Q(W diag(s)) diag(s)^-1; when a packed format is asked for, such modules take s = 1 (clipping search
only), because a per-input-column factor is not representable in the group grid.

What it stores and how to deploy: `--format compressed-tensors` writes the integer codes, group scales and
zero points with the folded norms in an ordinary checkpoint for transformers (compressed-tensors
installed): with `--sym` it loads as is; AWQ's default asymmetric grid loads with
`quantization_config=CompressedTensorsConfig(dequantize=True)` (see compressor.formats.default_format, which
is why asymmetric AWQ defaults to dense). `--format dense` writes the dequantized weights (o_proj/down_proj
with their explicit scale folded back), for evaluation or any runtime that takes float weights.

Statistics: hessian [in, in] and act_absmean [in]. Quantizer: the min/max grid of GPTQ and RTN
(lmsqueeze.kernels.obs.find_params), so with alpha = 0 and no clipping AWQ is RTN bit for bit.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lmsqueeze.compressor.config import _check_quant, _Config
from lmsqueeze.compressor.methods import LayerResult, register
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.obs import QuantGrid, QuantSpec, _one_thread, grid_from_range


@dataclass(frozen=True)
class AWQConfig(_Config):
    """bits, group_size, sym: the group grid; grid: alpha candidates 0, 1/grid, ..., (grid - 1)/grid;
    clip: search a range shrink per (row, group) among clip_grid steps down to max_shrink."""

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    method = "awq"

    def __post_init__(self):
        super().__post_init__()
        _check_quant(self)
        for name in ("grid", "clip_grid"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise LmsqueezeError(f"awq {name} {v!r} is invalid; valid: an integer >= 1 (default 20)")
        if not 0.0 < float(self.max_shrink) <= 1.0:
            raise LmsqueezeError(f"awq max_shrink {self.max_shrink} is out of range; valid: 0 < max_shrink <= 1 "
                                 f"(default 0.5)")

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)

    def describe(self) -> str:
        return (f"awq {self.bits}-bit" + ("" if self.group_size == -1 else f" g{self.group_size}")
                + (" sym" if self.sym else "") + ("" if self.clip else " no-clip"))


def _grouped(W: torch.Tensor, gs: int) -> torch.Tensor:
    """[out, in] -> [out, groups, gs], the last group zero-padded (0 is in every group's range anyway)."""
    out, cols = W.shape
    pad = (-cols) % gs
    if pad:
        W = torch.nn.functional.pad(W, (0, pad))
    return W.reshape(out, -1, gs)


def group_quantize(W: torch.Tensor, spec: QuantSpec, shrink: torch.Tensor | None = None):
    """Quantize-dequantize W [out, in] fp32 on the min/max group grid, each (row, group) range times `shrink`
    ([out, groups], None: 1). Returns (Wq [out, in], codes uint8 [out, in], scale [out, groups], zero
    [out, groups]), the same fp32 operations as lmsqueeze.kernels.obs.find_params and quantize."""
    out, cols = W.shape
    gs = cols if spec.group_size == -1 else spec.group_size
    Wg = _grouped(W, gs)
    xmin = Wg.amin(-1).clamp(max=0)
    xmax = Wg.amax(-1).clamp(min=0)
    if shrink is not None:
        xmin, xmax = xmin * shrink, xmax * shrink
    scale, zero = grid_from_range(xmin, xmax, spec)
    q = torch.clamp(torch.round(Wg / scale[..., None]) + zero[..., None], 0, spec.maxq)
    Wq = (scale[..., None] * (q - zero[..., None])).reshape(out, -1)[:, :cols]
    return Wq, q.reshape(out, -1)[:, :cols].to(torch.uint8), scale, zero


def _output_error(D: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T): twice the summed squared output error of weight error D [out, in] on the calibration inputs."""
    return float(((D @ H) * D).sum())


def _scales(act: torch.Tensor, alpha: float) -> torch.Tensor:
    s = act.clamp(min=1e-5).pow(alpha)
    return s / torch.sqrt(s.max() * s.min())


def _clip_search(Ws: torch.Tensor, Hs: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """The range shrink [out, groups] minimising each (row, group)'s error E_g Hs_gg E_g^T (E = Q(Ws) - Ws)."""
    spec = cfg.quant_spec()
    out, cols = Ws.shape
    gs = cols if spec.group_size == -1 else spec.group_size
    pad = (-cols) % gs
    Hp = torch.nn.functional.pad(Hs, (0, pad, 0, pad)) if pad else Hs
    G = Hp.shape[0] // gs
    blocks = torch.stack([Hp[g * gs:(g + 1) * gs, g * gs:(g + 1) * gs] for g in range(G)])  # [G, gs, gs]
    Wg = _grouped(Ws, gs)
    best = torch.full((out, G), float("inf"), device=Ws.device)
    shrink = torch.ones((out, G), device=Ws.device)
    for k in range(cfg.clip_grid):
        r = 1.0 - k * (1.0 - cfg.max_shrink) / max(cfg.clip_grid - 1, 1)
        ratio = torch.full((out, G), r, device=Ws.device)
        E = _grouped(group_quantize(Ws, spec, ratio)[0], gs) - Wg              # [out, G, gs]
        Et = E.transpose(0, 1)                                                 # [G, out, gs]
        err = (torch.bmm(Et, blocks) * Et).sum(-1).transpose(0, 1)             # [out, G]
        better = err < best
        best = torch.where(better, err, best)
        shrink = torch.where(better, ratio, shrink)
    return shrink


def awq_group(Ws: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], cfg: AWQConfig, keep_grid: bool = False,
              scalable: bool = False) -> dict[str, LayerResult]:
    """AWQ for the modules that read one input: Ws {name: W [out_m, in]}, stats hessian [in, in] and act_absmean
    [in] of that input. scalable: the caller folds the returned input_scale s [in] into the input's producer;
    then each result's W is Q(W diag(s)) (on its grid) and input_scale is s. Otherwise W is Q(W diag(s)) / s
    (acting on the input as it is), and with keep_grid the search is skipped (s = 1) so the grid stays exact.
    result.info["alpha"]: the exponent chosen.
    """
    rows = sum(W.shape[0] for W in Ws.values())
    cols = next(iter(Ws.values())).shape[1]
    # small layers: a few hundred tiny ops per search, where threads cost more in synchronisation than they
    # save (a [128, 64] x [64, 64] error: 0.34 ms on one thread, 42 ms on two, on the shared 2-core box)
    with _one_thread() if rows * cols * cols < 2 ** 26 else contextlib.nullcontext():
        return _awq_group(Ws, stats, cfg, keep_grid, scalable)


def _awq_group(Ws, stats, cfg, keep_grid, scalable):
    H = stats["hessian"].float()
    act = stats["act_absmean"].float()
    Wf = {n: W.float() for n, W in Ws.items()}
    spec = cfg.quant_spec()
    alphas = [0.0] if (keep_grid and not scalable) else [k / cfg.grid for k in range(cfg.grid)]
    best_alpha, best_err = 0.0, float("inf")
    for alpha in alphas:
        s = _scales(act, alpha)
        err = sum(_output_error(group_quantize(W * s, spec)[0] / s - W, H) for W in Wf.values())
        if err < best_err:
            best_alpha, best_err = alpha, err
    s = _scales(act, best_alpha)
    Hs = H / s[:, None] / s[None, :]  # the Hessian of the scaled input x / s
    out = {}
    for name, W in Wf.items():
        shrink = _clip_search(W * s, Hs, cfg) if cfg.clip else None
        Wq, codes, scale, zero = group_quantize(W * s, spec, shrink)
        grid = None
        if keep_grid and (scalable or best_alpha == 0.0):
            gs = W.shape[1] if spec.group_size == -1 else spec.group_size
            g_idx = (torch.arange(W.shape[1], device=W.device) // gs).to(torch.int32)
            grid = QuantGrid(codes, scale, zero, g_idx, spec.bits, spec.group_size, spec.sym)
        info = {"alpha": best_alpha}
        if scalable:
            out[name] = LayerResult(Wq, None, grid=grid, input_scale=s, info=info)
        else:
            out[name] = LayerResult(Wq / s, None, grid=grid, info=info)
    return out


register("awq", AWQConfig, kind="quantize", needs=("hessian", "act_absmean"), solve_group=awq_group,
         summary="activation-aware scales, then the group quantizer")
