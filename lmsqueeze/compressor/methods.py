"""Per-layer method math: pure functions of one weight matrix and its calibration statistic.

W is [out, in] (the nn.Linear layout) in any dtype; every function works in fp32 and returns a
LayerResult with the new fp32 weights and the KEEP mask (True = kept; None for pure quantization).
Nothing here knows about models; the driver feeds the statistics in.

- magnitude(W, cfg): prune the smallest |W| over the layer (or per row), or N:M.
- wanda(W, col_sq_norm, cfg): prune the smallest |W_ij| * ||X_j||_2 within each row, or N:M; no update.
- sparsegpt(W, H, cfg): blocked OBS pruning (optionally jointly quantized), kernels.obs_update.
- gptq(W, H, cfg): blocked OBS quantization, optional act-order, kernels.obs_update.
- rtn(W, cfg): round to nearest on the same grid as GPTQ.

keep_grid=True (quantizers): the LayerResult also carries the QuantGrid (integer codes, scales, zeros,
g_idx) the solver chose, which packed checkpoints store as they are.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import nm_mask, obs_update, quantize_rtn, rowwise_mask, wanda_mask
from lmsqueeze.kernels.obs import QuantGrid, quantize_rtn_grid

log = logging.getLogger("lmsqueeze")

MAX_DAMP_RETRIES = 6  # percdamp * 10^6 on the last try: past that H is not a Hessian any more


@dataclass
class LayerResult:
    W: torch.Tensor                 # [out, in] fp32, the compressed weights
    mask: torch.Tensor | None       # [out, in] bool KEEP mask, None when nothing was pruned
    loss: float | None = None       # OBS loss estimate sum (w - q)^2 / [Hinv]_jj^2 / 2 (sparsegpt, gptq)
    percdamp: float | None = None   # the damping that made H positive definite (after retries)
    dead: int = 0                   # inputs with diag(H) == 0 (their column was zeroed)
    grid: QuantGrid | None = None   # the quantization grid (keep_grid=True, quantizers only)


def _keep_from_scores(scores: torch.Tensor, cfg, per_row: bool) -> torch.Tensor:
    nm = cfg.nm
    if nm:
        return nm_mask(scores, nm[0], nm[1])
    if per_row:
        return rowwise_mask(scores, cfg.fraction)
    # over the whole layer: exactly round(s * numel) lowest scores pruned, ties by index (stable sort)
    flat = scores.reshape(1, -1)
    return rowwise_mask(flat, cfg.fraction).reshape(scores.shape)


def magnitude(W: torch.Tensor, cfg) -> LayerResult:
    W = W.float()
    cfg.check_width(W.shape[1], "this layer")
    keep = _keep_from_scores(W.abs(), cfg, per_row=cfg.scope == "row")
    return LayerResult(W.masked_fill(~keep, 0.0), keep)


def wanda(W: torch.Tensor, col_sq_norm: torch.Tensor, cfg) -> LayerResult:
    cfg.check_width(W.shape[1], "this layer")
    # fused: scores |W| * sqrt(col_sq_norm) are formed inside the mask kernel, never stored; W is
    # read in its own dtype (the kernel upcasts exactly, as the reference does), half the bytes of fp32
    nm = cfg.nm
    Wm = W if W.dtype in (torch.float32, torch.bfloat16, torch.float16) else W.float()
    keep = wanda_mask(Wm, col_sq_norm, n=nm[0], m=nm[1]) if nm else wanda_mask(Wm, col_sq_norm, sparsity=cfg.fraction)
    return LayerResult(W.float().masked_fill(~keep, 0.0), keep)


def rtn(W: torch.Tensor, cfg, keep_grid: bool = False) -> LayerResult:
    if keep_grid:
        Wq, grid = quantize_rtn_grid(W.float(), cfg.quant_spec())
        return LayerResult(Wq, None, grid=grid)
    return LayerResult(quantize_rtn(W.float(), cfg.quant_spec()), None)


def prepare_hessian(W: torch.Tensor, H: torch.Tensor, percdamp: float):
    """Dead inputs and the damped inverse: (W, Hinv upper Cholesky of (H + damp I)^-1, percdamp used, #dead).

    Dead inputs (diag(H) == 0: that input was always 0 in calibration) get H_jj = 1 and W[:, j] = 0,
    as the SparseGPT/GPTQ papers do: the weight cannot matter on this data, and H stays invertible.
    damp = percdamp * mean(diag(H)); when a Cholesky factorization fails the damping grows tenfold
    and the retry is logged.
    """
    W = W.float().clone()
    H = H.float().clone()
    dead = torch.diag(H) == 0
    ndead = int(dead.sum())
    if ndead:
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    mean_diag = float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    pd = percdamp
    for attempt in range(MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(H + (pd * mean_diag) * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return W, U, pd, ndead
        new = max(pd * 10, 1e-4)
        log.warning("Hessian is not positive definite with percdamp %.3g (try %d); retrying with %.3g",
                    pd, attempt + 1, new)
        pd = new
    raise LmsqueezeError(f"the Hessian stayed singular up to percdamp {pd:g}: the calibration inputs of this "
                         f"layer are degenerate (too few tokens? nan/inf activations?)")


def sparsegpt(W: torch.Tensor, H: torch.Tensor, cfg, keep_grid: bool = False) -> LayerResult:
    cfg.check_width(W.shape[1], "this layer")
    W, Hinv, pd, ndead = prepare_hessian(W, H, cfg.percdamp)
    quant = cfg.quant_spec()
    Wn, keep, losses, *grid = obs_update(W, Hinv, blocksize=cfg.blocksize, prune=cfg.prune_spec(), quant=quant,
                                         return_grid=keep_grid and quant is not None)
    return LayerResult(Wn, keep, float(losses.sum()), pd, ndead, grid=grid[0] if grid else None)


def gptq(W: torch.Tensor, H: torch.Tensor, cfg, keep_grid: bool = False) -> LayerResult:
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


def compress_weight(W: torch.Tensor, stat: torch.Tensor | None, cfg, keep_grid: bool = False) -> LayerResult:
    """Dispatch on the config's method. stat: col_sq_norm [in] (wanda), H [in, in] (sparsegpt, gptq), else None.

    keep_grid: quantizers also return their QuantGrid (ignored by pure pruners)."""
    if cfg.method == "magnitude":
        return magnitude(W, cfg)
    if cfg.method == "wanda":
        return wanda(W, stat, cfg)
    if cfg.method == "sparsegpt":
        return sparsegpt(W, stat, cfg, keep_grid)
    if cfg.method == "gptq":
        return gptq(W, stat, cfg, keep_grid)
    if cfg.method == "rtn":
        return rtn(W, cfg, keep_grid)
    raise LmsqueezeError(f"unknown method '{cfg.method}'")


def check_finite(t: torch.Tensor, what: str, hint: str = "") -> None:
    """Stop with one error when `t` holds nan or inf. Every method needs this up front: a NaN score is never
    selected by a mask, a NaN weight survives magnitude pruning, and a NaN error compares False with 0, so
    without it a non-finite input passes silently and is reported as a perfect (0.0) reconstruction."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n = int(bad.sum())
        kinds = "/".join(k for k, present in (("nan", bool(torch.isnan(t).any())), ("inf", bool(torch.isinf(t).any())))
                         if present)
        raise LmsqueezeError(f"{what} hold {n} non-finite value{'s' if n > 1 else ''} ({kinds}) of {t.numel()}; "
                             f"every value must be finite{hint}")


def check_result(res: LayerResult, name: str) -> None:
    """The solver's output: compressed weights and loss estimate finite (a singular update would spread nan)."""
    check_finite(res.W, f"the compressed weights of {name}")
    if res.loss is not None and not math.isfinite(res.loss):
        raise LmsqueezeError(f"the OBS loss estimate of {name} is {res.loss}; the Hessian of its calibration inputs "
                             f"is not usable (non-finite activations?)")
