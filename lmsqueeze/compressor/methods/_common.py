"""What every method module shares: the per-layer result, Hessian preparation and finiteness checks."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels import nm_mask, rowwise_mask
from lmsqueeze.kernels.obs import QuantGrid

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
    # [in] fp32: W holds the weights for inputs divided by this scale (AWQ after folding: the driver
    # divides the producer of the input by it); None: W acts on the inputs as they are
    input_scale: torch.Tensor | None = None
    info: dict | None = None        # what a method wants in the module's record (e.g. AWQ's alpha)


def keep_from_scores(scores: torch.Tensor, cfg, per_row: bool) -> torch.Tensor:
    """KEEP mask from scores (higher = keep): N:M, per output row, or over the whole layer."""
    nm = cfg.nm
    if nm:
        return nm_mask(scores, nm[0], nm[1])
    if per_row:
        return rowwise_mask(scores, cfg.fraction)
    # over the whole layer: exactly round(s * numel) lowest scores pruned, ties by index (stable sort)
    flat = scores.reshape(1, -1)
    return rowwise_mask(flat, cfg.fraction).reshape(scores.shape)


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
