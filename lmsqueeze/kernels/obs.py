"""The blocked Optimal-Brain-Surgeon sweep shared by SparseGPT and GPTQ, and the quantization grid.

Given a layer's weights W [rows, cols] and Hinv, the upper Cholesky factor of the damped inverse
Hessian (H = 2/N X^T X, so Hinv^T Hinv = (H + damp I)^-1), the sweep walks the columns left to
right in blocks of `blocksize`. Column i is replaced by its compressed value q (zero where pruned,
the nearest grid point where quantized) and the error it leaves, err = (w - q) / Hinv[i, i], is
pushed onto the columns not yet visited: W[:, j] -= err * Hinv[i, j] (j > i). Inside a block that
update is a rank-1 step per column; the rest of the matrix gets one GEMM per block,
W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:], which is where nearly all the FLOPs are.

Modes (both at once = joint sparse + quantized output, zeros kept exact):
- prune, unstructured (SparseGPT, adaptive mask): at the start of each block the weights of the
  block with the lowest w^2 / Hinv[j, j]^2 are pruned. The count per block is chosen so that the
  running total is round(sparsity * rows * cols_so_far): the whole layer ends with exactly
  round(sparsity * rows * cols) zeros, spread over rows as the saliency decides.
- prune, N:M: at every m-th column, in each row the m - n columns of the next m with the lowest
  w^2 / Hinv[j, j]^2 (weights as updated so far) are pruned. blocksize must be a multiple of m.
- quant (GPTQ): asymmetric or symmetric min/max grid with 2^bits levels per output row and per
  group of `group_size` consecutive columns in sweep order (-1: one group per row). A group's scale
  and zero point come from the group's current, error-updated weights when the sweep reaches its
  first column (GPTQ's default, not its "static groups"). Act-order is the caller's business:
  permute W's columns and H by descending diag(H) before the sweep and undo it after, so groups
  are consecutive in the permuted order (what the GPTQ reference does without static groups).

Ties in the saliency are broken the way a stable sort does: the lower row-major index (unstructured)
or the lower column (N:M) is pruned first. Every backend keeps that rule, so masks are reproducible.

Backends (obs_update chooses): "ref" below; "cpu", csrc/cpu/obs.cpp: rows split over threads, each
row sweeps a block's columns in cache, one BLAS call per block for the trailing update; it repeats
the reference's fp32 operations in the same order, so its mask and weights match the reference's
(bit for bit on the dev box; tests allow 1e-5 * max|W| for BLAS summation order); "triton",
lmsqueeze/kernels/triton/obs.py: one launch per block plus one matmul.

The grid (find_params / quantize / quantize_rtn) lives here too, so RTN and GPTQ share one grid.
A QuantGrid records it: the integer code of every weight and each group's scale and zero point, so a
packed checkpoint stores the solver's own values (obs_update(..., return_grid=True), quantize_rtn_grid).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from lmsqueeze import _ext
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels._dispatch import choose_backend

IMPLEMENTED = ("ref", "cpu", "triton")
BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class PruneSpec:
    """What to prune: `sparsity` in [0, 1) (unstructured) or n of every m kept along the input dim."""

    sparsity: float | None = None
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if (self.sparsity is None) == (self.m == 0):
            raise LmsqueezeError("PruneSpec needs either sparsity (unstructured) or n and m (N:M), not both")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise LmsqueezeError(f"sparsity {self.sparsity} is out of range; valid: 0 <= sparsity < 1")
        if self.m:
            from lmsqueeze.kernels.masks import check_nm

            check_nm(self.n, self.m)

    @property
    def nm(self) -> bool:
        return self.m > 0


@dataclass(frozen=True)
class QuantSpec:
    """The grid: `bits` in (2, 3, 4, 8), `group_size` columns per scale (-1: per output row), sym or not."""

    bits: int = 4
    group_size: int = -1
    sym: bool = False

    def __post_init__(self):
        if self.bits not in BITS:
            raise LmsqueezeError(f"bits {self.bits} is not supported; valid: {', '.join(map(str, BITS))}")
        if self.group_size != -1 and self.group_size < 1:
            raise LmsqueezeError(f"group size {self.group_size} is invalid; valid: -1 (per channel) or >= 1")

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1


# ---- the grid ----------------------------------------------------------------------------------------

def find_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point ([rows, 1] fp32 each) of the min/max grid for w [rows, k].

    The range always contains 0 (so 0 is a grid point and pruned zeros stay exact); symmetric grids
    are centred on zero = (maxq + 1) / 2; an all-zero row gets the range [-1, 1].
    """
    w = w.float()
    scale, zero = grid_from_range(w.min(dim=1).values.clamp(max=0), w.max(dim=1).values.clamp(min=0), spec)
    return scale[:, None], zero[:, None]


def grid_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the grid over [xmin, xmax] (fp32, any shape, xmin <= 0 <= xmax): symmetric grids take
    the larger magnitude on both sides and centre zero at (maxq + 1) / 2; an empty range becomes [-1, 1]."""
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / spec.maxq
    zero = torch.full_like(scale, (spec.maxq + 1) / 2) if spec.sym else torch.round(-xmin / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Quantize-dequantize: scale * (clamp(round(w / scale) + zero, 0, maxq) - zero), fp32."""
    q = torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)
    return scale * (q - zero)


def quantize_rtn(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest on the same grid as GPTQ: groups of group_size consecutive columns (the last
    group of a row holds the remainder when group_size does not divide the width)."""
    return quantize_rtn_grid(W, spec)[0]


@dataclass
class QuantGrid:
    """The grid a quantizer put a layer on: W[:, c] == scale[:, g_idx[c]] * (codes[:, c] - zero[:, g_idx[c]]) in fp32.

    codes [rows, cols] uint8 in [0, 2^bits - 1], in the weight's own column order; scale and zero
    [rows, groups] fp32 (zero holds integers); g_idx [cols] int32, the group of each column: c // group_size,
    or with act-order the group of the column's place in the sweep. Pruned weights have code == zero.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int      # columns per group in sweep order; -1: one group per row
    sym: bool
    act_order: bool = False

    def dequantize(self) -> torch.Tensor:
        """[rows, cols] fp32, bit for bit the weights the solver produced."""
        g = self.g_idx.long()
        return self.scale[:, g] * (self.codes.float() - self.zero[:, g])

    def permuted(self, perm: torch.Tensor) -> QuantGrid:
        """The grid of a sweep over W[:, perm], mapped back to W's column order (act-order)."""
        inv = torch.argsort(perm)
        return QuantGrid(self.codes[:, inv], self.scale, self.zero, self.g_idx[inv], self.bits, self.group_size,
                         self.sym, act_order=True)


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """The integer codes quantize() rounds to (same fp32 operations), as uint8."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq).to(torch.uint8)


def _group_index(cols: int, spec: QuantSpec, device) -> torch.Tensor:
    gs = cols if spec.group_size == -1 else spec.group_size
    return (torch.arange(cols, device=device) // gs).to(torch.int32)


def quantize_rtn_grid(W: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, QuantGrid]:
    """(quantize_rtn(W, spec), the grid it used)."""
    W = W.float()
    rows, cols = W.shape
    gs = cols if spec.group_size == -1 else spec.group_size
    ngroups = -(-cols // gs)
    out = torch.empty_like(W)
    codes = torch.empty((rows, cols), dtype=torch.uint8, device=W.device)
    scales = torch.empty((rows, ngroups), dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    for g, j in enumerate(range(0, cols, gs)):
        scale, zero = find_params(W[:, j:j + gs], spec)
        codes[:, j:j + gs] = _codes(W[:, j:j + gs], scale, zero, spec.maxq)
        out[:, j:j + gs] = quantize(W[:, j:j + gs], scale, zero, spec.maxq)
        scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
    return out, QuantGrid(codes, scales, zeros, _group_index(cols, spec, W.device), spec.bits, spec.group_size, spec.sym)


@contextlib.contextmanager
def _one_thread():
    """The in-block column steps are a few small ops on [rows, <= blocksize] tensors: splitting them over
    threads costs more in synchronisation than it saves. Measured on the 2-core dev box (shared), one
    [1536, 576] unstructured sweep: 0.7 s with 1 thread, 3.5-8.9 s with 2. The trailing GEMM keeps all."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---- the sweep ---------------------------------------------------------------------------------------

def _check(W, Hinv, blocksize, prune, quant):
    if W.dim() != 2 or W.dtype != torch.float32:
        raise LmsqueezeError(f"W must be a 2-D float32 matrix, got {tuple(W.shape)} {W.dtype}")
    cols = W.shape[1]
    if Hinv.shape != (cols, cols) or Hinv.dtype != torch.float32:
        raise LmsqueezeError(f"Hinv must be float32 [{cols}, {cols}], got {tuple(Hinv.shape)} {Hinv.dtype}")
    if blocksize < 1:
        raise LmsqueezeError(f"blocksize must be >= 1, got {blocksize}")
    if prune is None and quant is None:
        raise LmsqueezeError("obs_update needs prune, quant or both")
    if prune is not None and prune.nm:
        from lmsqueeze.kernels.masks import check_nm

        check_nm(prune.n, prune.m, cols)
        if blocksize % prune.m:
            raise LmsqueezeError(f"blocksize {blocksize} must be a multiple of M = {prune.m} for N:M pruning")


def obs_update_ref(W: torch.Tensor, Hinv: torch.Tensor, *, blocksize: int = 128, prune: PruneSpec | None = None,
                   quant: QuantSpec | None = None, return_grid: bool = False):
    """The published blocked loop (SparseGPT Alg. 1 / GPTQ Alg. 1), paper symbols kept.

    W [rows, cols] fp32 (not modified), Hinv [cols, cols] fp32 upper Cholesky factor of H^-1.
    Returns (W_new [rows, cols] fp32, keep mask [rows, cols] bool or None when nothing is pruned,
    losses [rows] fp32: sum over columns of (w - q)^2 / Hinv[j, j]^2 / 2, the OBS estimate), and with
    return_grid (quant only) a fourth item, the QuantGrid the sweep chose (W_new == grid.dequantize()).
    """
    W = W.clone()
    rows, cols = W.shape
    mask = torch.ones_like(W, dtype=torch.bool) if prune is not None else None
    Losses = torch.zeros(rows, dtype=torch.float32, device=W.device)
    scale = zero = None
    record = return_grid and quant is not None
    if record:
        ngroups = 1 if quant.group_size == -1 else -(-cols // quant.group_size)
        codes = torch.empty((rows, cols), dtype=torch.uint8, device=W.device)
        scales = torch.empty((rows, ngroups), dtype=torch.float32, device=W.device)
        zeros = torch.empty_like(scales)
    if quant is not None and quant.group_size == -1:
        scale, zero = find_params(W, quant)
        if record:
            scales[:, 0], zeros[:, 0] = scale[:, 0], zero[:, 0]
    count = 0  # weights pruned so far (unstructured): keeps the layer total exact
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2]  # a view: in-block updates land in W, so group parameters see them
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prune is not None and not prune.nm:
            tmp = W1 ** 2 / torch.diag(Hinv1)[None, :] ** 2
            k = int(round(prune.sparsity * rows * i2)) - count
            if k > 0:
                idx = torch.sort(tmp.flatten(), stable=True).indices[:k]
                mask1 = torch.ones(tmp.numel(), dtype=torch.bool, device=W.device)
                mask1[idx] = False
                mask[:, i1:i2] = mask1.view_as(tmp)
                count += k
        with _one_thread():  # column steps: small ops, see _one_thread
            for i in range(i2 - i1):
                w = W1[:, i].clone()
                d = Hinv1[i, i]
                if prune is not None and prune.nm and i % prune.m == 0:
                    tmp = W1[:, i:i + prune.m] ** 2 / torch.diag(Hinv1)[i:i + prune.m][None, :] ** 2
                    drop = torch.sort(tmp, dim=1, stable=True).indices[:, :prune.m - prune.n]
                    mask[:, i1 + i:i1 + i + prune.m].scatter_(1, drop, False)
                q = w.clone()
                if quant is not None:
                    if quant.group_size != -1 and (i1 + i) % quant.group_size == 0:
                        scale, zero = find_params(W[:, i1 + i:i1 + i + quant.group_size], quant)
                        if record:
                            g = (i1 + i) // quant.group_size
                            scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
                    if record:
                        codes[:, i1 + i] = _codes(q[:, None], scale, zero, quant.maxq)[:, 0]
                    q = quantize(q[:, None], scale, zero, quant.maxq)[:, 0]
                if prune is not None:
                    q[~mask[:, i1 + i]] = 0
                    if record:  # a pruned weight is exactly 0: its code is the zero point
                        codes[~mask[:, i1 + i], i1 + i] = zero[~mask[:, i1 + i], 0].to(torch.uint8)
                Q1[:, i] = q
                Losses1[:, i] = (w - q) ** 2 / d ** 2 / 2
                err1 = (w - q) / d
                W1[:, i:] -= err1[:, None] * Hinv1[i, i:][None, :]
                Err1[:, i] = err1
        W[:, i1:i2] = Q1
        Losses += Losses1.sum(dim=1)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if record:
        return W, mask, Losses, QuantGrid(codes, scales, zeros, _group_index(cols, quant, W.device), quant.bits,
                                          quant.group_size, quant.sym)
    return W, mask, Losses


def block_prune_counts(sparsity: float, rows: int, cols: int, blocksize: int) -> list[int]:
    """Weights the unstructured mode prunes in each block: the reference's running-total rule, per block."""
    counts, count = [], 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        k = max(int(round(sparsity * rows * i2)) - count, 0)
        counts.append(k)
        count += k
    return counts


def obs_update(W: torch.Tensor, Hinv: torch.Tensor, *, blocksize: int = 128, prune: PruneSpec | None = None,
               quant: QuantSpec | None = None, backend: str | None = None, return_grid: bool = False):
    """The one entry for the OBS sweep; see obs_update_ref for the contract.

    backend: None (auto: "cpu" for CPU tensors when the extension is built, "triton" for CUDA
    tensors), "ref", "cpu" or "triton"; LMSQUEEZE_BACKEND forces one too. The fast paths give the
    reference's mask and, up to fp32 summation order, its weights (tests/kernels/test_obs_fast.py).
    return_grid (with quant): also return the QuantGrid. Only the reference records a group's scale
    and zero when the sweep reaches it (the fast kernels keep them in registers), so the sweep runs
    there: a packed checkpoint then holds the very codes, scales and zeros the solver chose.
    """
    _check(W, Hinv, blocksize, prune, quant)
    if return_grid and quant is not None:
        if backend not in (None, "ref"):
            raise LmsqueezeError(f"obs_update backend '{backend}' does not return the quantization grid; "
                                 f"valid with return_grid: ref (or None)")
        return obs_update_ref(W, Hinv, blocksize=blocksize, prune=prune, quant=quant, return_grid=True)
    chosen = choose_backend("obs_update", W.device, backend, IMPLEMENTED)
    if chosen == "ref":
        return obs_update_ref(W, Hinv, blocksize=blocksize, prune=prune, quant=quant)
    if chosen == "triton":
        from lmsqueeze.kernels.triton.obs import obs_update_triton

        return obs_update_triton(W, Hinv, blocksize=blocksize, prune=prune, quant=quant)
    if chosen == "cpu":
        rows, cols = W.shape
        counts = (block_prune_counts(prune.sparsity, rows, cols, blocksize)
                  if prune is not None and not prune.nm else [])
        nm_n, nm_m = (prune.n, prune.m) if prune is not None and prune.nm else (0, 0)
        bits, gs, sym = (quant.bits, quant.group_size, quant.sym) if quant is not None else (0, -1, False)
        return _ext.ext().obs_update_cpu(W, Hinv, blocksize, counts, nm_n, nm_m, bits, gs, sym)
    raise AssertionError(f"unhandled backend {chosen}")
