"""2:4 sparse weights: one compressed format, a matmul on it, and the dense-or-2:4 choice.

Format
------
A weight W [out, in] is 2:4 when every group of 4 consecutive entries along the input dimension
(columns 4g .. 4g+3 of a row) holds at most 2 non-zeros. It is stored as two tensors:

- values [out, in/2], W's dtype: values[n, 2g] = W[n, 4g + i0], values[n, 2g + 1] = W[n, 4g + i1],
  the two kept entries of group g in column order (i0 < i1).
- meta [out, in/16], int16: the positions, 4 bits per group, 4 groups per int16. Word w of row n
  covers columns 16w .. 16w+15 (groups 4w .. 4w+3); group 4w + k sits in bits [4k, 4k + 4) with
  i0 in the low 2 bits and i1 in the high 2 bits. Read the word as unsigned (bit 15 may be set).

A group with fewer than 2 non-zeros keeps its non-zeros plus the lowest-index zeros, so decompress
is exact. Bytes per weight: 0.5 values + 1/8 meta, i.e. 1.125 bytes per bf16 weight instead of 2
(0.5625 of a dense GEMV's traffic), which is all a memory-bound decode kernel can win. The width
must be a multiple of 16 (one meta word); the CPU kernel needs no other alignment.

    y = x @ decompress(values, meta).T + bias                    (sparse24_matmul, any batch)

Backends
--------
`sparse24_matmul_ref` (decompress + F.linear in fp32) is the oracle; `cpu` is the C++ kernel
(csrc/cpu/sparse24.cpp: AVX-512-BF16 / AVX-512 / AVX2 / generic, chosen at run time); `triton` is a
kernel that decompresses the weight tile in registers (small batches on GPU; CI runs it under the
interpreter); `cuda` is torch's semi-structured sparse tensor (cuSPARSELt/CUTLASS, CUDA only), used
for larger batches, with the converted weight cached per tensor.

Dense or 2:4
------------
2:4 only pays where the matmul is memory-bound (small batches, big layers); elsewhere dense wins.
`choose_sparse24(out, in, rows, dtype, device)` times both once per (out, in, batch bucket, dtype,
device) and picks 2:4 only when it measured at least 5% faster than dense `F.linear`; the margin
keeps timing noise from shipping a slower choice. `set_sparse24_mode("dense" | "sparse24" | "auto")`
or LMSQUEEZE_SPARSE24 forces one.
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

from lmsqueeze import _ext
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels._dispatch import BACKENDS, choose_backend

log = logging.getLogger("lmsqueeze")

IMPLEMENTED = ("ref", "cpu", "cuda", "triton")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPU_DTYPES = (torch.float32, torch.bfloat16)
# Rows of x up to which the Triton kernel (weights decompressed in registers) serves on GPU; above,
# the tensor-core path of torch's semi-structured sparse tensors is the better fit.
TRITON_MAX_ROWS = 16
GROUP_COLS = 16  # input columns per meta word


# ---- format ---------------------------------------------------------------------------------------
def check_24(W: torch.Tensor) -> None:
    """Raise naming the first group of 4 with more than 2 non-zeros, or a width that is not a multiple of 16."""
    if W.dim() != 2:
        raise LmsqueezeError(f"a 2:4 weight must be 2-D [out, in], got shape {tuple(W.shape)}")
    out, cols = W.shape
    if cols % GROUP_COLS != 0:
        raise LmsqueezeError(f"the 2:4 format needs an input width that is a multiple of {GROUP_COLS}; "
                             f"this weight has {cols} columns")
    counts = (W.reshape(out, cols // 4, 4) != 0).sum(-1)
    bad = (counts > 2).nonzero()
    if bad.numel():
        r, g = bad[0].tolist()
        group = W[r, 4 * g: 4 * g + 4].tolist()
        raise LmsqueezeError(f"weight is not 2:4: row {r}, columns {4 * g}..{4 * g + 3} hold {int(counts[r, g])} "
                             f"non-zeros {group} (at most 2 of every 4 may be non-zero); "
                             f"{bad.shape[0]} bad group(s) in all")


def is_24(W: torch.Tensor) -> bool:
    """True when W is 2-D, its width a multiple of 16 and every group of 4 has at most 2 non-zeros."""
    if W.dim() != 2 or W.shape[1] % GROUP_COLS != 0:
        return False
    return bool(((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def compress(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] (2:4, in % 16 == 0) -> (values [out, in/2] in W's dtype, meta [out, in/16] int16)."""
    check_24(W)
    out, cols = W.shape
    groups = W.reshape(out, cols // 4, 4)
    # Non-zeros first, then the lower position: the top 2 keys are the kept pair; sorted so i0 < i1.
    key = (groups != 0).to(torch.int8) * 4 + torch.arange(3, -1, -1, dtype=torch.int8, device=W.device)
    idx = key.topk(2, dim=-1).indices.sort(dim=-1).values                      # [out, in/4, 2]
    values = groups.gather(-1, idx).reshape(out, cols // 2).contiguous()
    codes = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.int32)                 # [out, in/4], 4 bits each
    shifts = torch.tensor([0, 4, 8, 12], dtype=torch.int32, device=W.device)
    words = (codes.reshape(out, cols // GROUP_COLS, 4) << shifts).sum(-1)       # [out, in/16], 0..65535
    meta = torch.where(words >= 32768, words - 65536, words).to(torch.int16).contiguous()
    return values, meta


def _positions(meta: torch.Tensor) -> torch.Tensor:
    """meta [out, in/16] int16 -> kept positions [out, in/4, 2] (int64, 0..3)."""
    words = meta.to(torch.int32) & 0xFFFF
    shifts = torch.arange(0, 16, 2, dtype=torch.int32, device=meta.device)     # i0, i1 of 4 groups
    pos = (words.unsqueeze(-1) >> shifts) & 3                                  # [out, in/16, 8]
    return pos.reshape(meta.shape[0], -1, 2).to(torch.int64)


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [out, in/2], meta [out, in/16]) -> dense W [out, in] with exact zeros."""
    _check_operands(values, meta)
    out, half = values.shape
    W = torch.zeros(out, half // 2, 4, dtype=values.dtype, device=values.device)
    W.scatter_(-1, _positions(meta), values.reshape(out, half // 2, 2))
    return W.reshape(out, half * 2)


def _check_operands(values: torch.Tensor, meta: torch.Tensor) -> None:
    if values.dim() != 2 or meta.dim() != 2:
        raise LmsqueezeError(f"values and meta must be 2-D, got {tuple(values.shape)} and {tuple(meta.shape)}")
    if meta.dtype != torch.int16:
        raise LmsqueezeError(f"meta must be int16, got {meta.dtype}")
    if values.dtype not in _DTYPES:
        raise LmsqueezeError(f"values must be float32, bfloat16 or float16, got {values.dtype}")
    out, half = values.shape
    if half % (GROUP_COLS // 2) != 0 or meta.shape != (out, half // (GROUP_COLS // 2)):
        raise LmsqueezeError(f"values {tuple(values.shape)} and meta {tuple(meta.shape)} do not describe a 2:4 "
                             f"weight [out, in]: need values [out, in/2] and meta [out, in/16] with in % 16 == 0")
    if values.device != meta.device:
        raise LmsqueezeError(f"values are on {values.device} but meta is on {meta.device}")


# ---- matmul ---------------------------------------------------------------------------------------
def sparse24_matmul_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: decompress, F.linear in fp32, cast back to x's dtype."""
    W = decompress(values, meta).float()
    y = F.linear(x.float(), W, None if bias is None else bias.float())
    return y.to(x.dtype)


def _check_matmul(x, values, meta, bias) -> None:
    _check_operands(values, meta)
    in_features = values.shape[1] * 2
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise LmsqueezeError(f"x's last dimension ({tuple(x.shape)}) must equal the weight's input width {in_features}")
    if x.dtype != values.dtype:
        raise LmsqueezeError(f"x is {x.dtype} but the weight values are {values.dtype}; they must match")
    if x.device != values.device:
        raise LmsqueezeError(f"x is on {x.device} but the weight is on {values.device}")
    if bias is not None and (bias.shape != (values.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
        raise LmsqueezeError(f"bias must be [{values.shape[0]}] {x.dtype} on {x.device}, "
                             f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")


def _semi_structured_available() -> str | None:
    try:
        from torch.sparse import to_sparse_semi_structured  # noqa: F401
    except ImportError as exc:
        return f"torch has no semi-structured sparse tensors ({exc})"
    return None


def _pick_backend(x: torch.Tensor, rows: int, backend: str | None) -> str:
    forced = backend or os.environ.get("LMSQUEEZE_BACKEND") or None
    if forced == "cuda":
        if x.device.type != "cuda":
            raise LmsqueezeError(f"backend 'cuda' cannot run sparse24_matmul: it takes CUDA tensors, got {x.device.type}")
        reason = _semi_structured_available()
        if reason:
            raise LmsqueezeError(f"backend 'cuda' cannot run sparse24_matmul: {reason}")
        return "cuda"
    if forced is not None and forced not in BACKENDS:
        raise LmsqueezeError(f"unknown backend '{forced}'; valid: {', '.join(BACKENDS)}")
    if forced is None and x.device.type == "cuda" and rows > TRITON_MAX_ROWS and _semi_structured_available() is None:
        return "cuda"
    chosen = choose_backend("sparse24_matmul", x.device, forced, ("ref", "cpu", "triton"))
    if chosen == "cpu" and x.dtype not in _CPU_DTYPES:
        if forced:
            raise LmsqueezeError(f"backend 'cpu' runs sparse24_matmul on float32 and bfloat16, got {x.dtype}")
        return "ref"
    return chosen


# Converted (cuSPARSELt/CUTLASS) weights, one per compressed tensor: the conversion is the "plan",
# done once at first use, never per call. Keyed by storage and version so an in-place edit re-converts.
_SEMI_CACHE: dict[tuple, torch.Tensor] = {}


def _semi_weight(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The weight as torch's semi-structured sparse tensor, converted once per compressed tensor.

    Raises LmsqueezeError when torch cannot convert this weight (shape or dtype its kernels do not
    take, e.g. fewer than 32 rows or 64 columns for CUTLASS, float32 without TF32 kernels)."""
    key = (values.data_ptr(), values.shape, values._version, meta.data_ptr(), meta._version)
    W = _SEMI_CACHE.get(key)
    if W is None:
        from torch.sparse import to_sparse_semi_structured

        if len(_SEMI_CACHE) >= 1024:
            _SEMI_CACHE.clear()
        try:
            W = to_sparse_semi_structured(decompress(values, meta))
        except (RuntimeError, ValueError) as exc:
            raise LmsqueezeError(f"torch's semi-structured sparse tensors cannot take this 2:4 weight "
                                 f"{tuple(values.shape[:1]) + (values.shape[1] * 2,)} {values.dtype}: {exc}") from None
        _SEMI_CACHE[key] = W
    return W


def _semi_convertible(values: torch.Tensor, meta: torch.Tensor) -> bool:
    try:
        _semi_weight(values, meta)
    except LmsqueezeError as exc:
        if ("semi", values.shape) not in _SEMI_WARNED:
            _SEMI_WARNED.add(("semi", values.shape))
            log.info("sparse24_matmul: using triton, not cuSPARSELt/CUTLASS: %s", exc)
        return False
    return True


_SEMI_WARNED: set = set()


def sparse24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """y [..., out] = x [..., in] @ W.T + bias for the 2:4 weight W stored as (values, meta).

    backend: None (auto), "ref", "cpu" (C++), "triton" or "cuda" (torch semi-structured sparse, CUDA
    only); LMSQUEEZE_BACKEND forces one too. Auto on CUDA: triton up to 16 rows, cuda above.
    """
    _check_matmul(x, values, meta, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    chosen = _pick_backend(x, rows, backend)
    auto = not (backend or os.environ.get("LMSQUEEZE_BACKEND"))
    if chosen == "ref":
        y = sparse24_matmul_ref(x2, values, meta, bias)
    elif chosen == "cpu":
        y = _ext.ext().sparse24_matmul_cpu(x2, values.contiguous(), meta.contiguous(), bias)
    elif chosen == "cuda" and auto and not _semi_convertible(values, meta):
        from lmsqueeze.kernels.triton.sparse24 import sparse24_matmul_triton

        y = sparse24_matmul_triton(x2, values, meta, bias)
    elif chosen == "triton":
        from lmsqueeze.kernels.triton.sparse24 import sparse24_matmul_triton

        y = sparse24_matmul_triton(x2, values, meta, bias)
    else:
        # torch pads x's rows to the cuSPARSELt/CUTLASS tile inside F.linear on a semi-structured weight
        y = F.linear(x2, _semi_weight(values, meta), bias)
    return y.reshape(*lead, values.shape[0])


# ---- dense or 2:4 ---------------------------------------------------------------------------------
MODES = ("auto", "dense", "sparse24")
_MODE: str | None = None
_CHOICES: dict[tuple, dict] = {}
# Bumped whenever the mode or the measurements change, so callers may cache choose_sparse24's answer.
EPOCH = [0]
MARGIN = 0.95  # 2:4 is chosen only when it takes at most 95% of dense's time


def set_sparse24_mode(mode: str | None) -> str | None:
    """Force "dense" or "sparse24" for every SparseLinear, or "auto" (measure); None: back to the env/auto."""
    global _MODE
    if mode is not None and mode not in MODES:
        raise LmsqueezeError(f"unknown sparse24 mode '{mode}'; valid: {', '.join(MODES)}")
    prev, _MODE = _MODE, mode
    EPOCH[0] += 1
    return prev


def sparse24_mode() -> str:
    mode = _MODE or os.environ.get("LMSQUEEZE_SPARSE24") or "auto"
    if mode not in MODES:
        raise LmsqueezeError(f"LMSQUEEZE_SPARSE24='{mode}' is not a mode; valid: {', '.join(MODES)}")
    return mode


def batch_bucket(rows: int) -> int:
    """Rows rounded up to a power of two, capped at 256 (beyond it both paths are compute-bound alike)."""
    b = 1
    while b < rows and b < 256:
        b *= 2
    return b


def _time(fn, min_seconds: float = 0.05, reps: int = 5) -> float:
    """Best of at least `reps` timed calls after one warm-up (best, not mean: noise only adds time)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    best, spent, n = float("inf"), 0.0, 0
    while n < reps or (spent < min_seconds and n < 50):
        t = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


_OPERANDS: dict[tuple, tuple] = {}


def _random_operands(out: int, in_features: int, dtype: torch.dtype, device: torch.device):
    """Random (W, values, meta) of this shape, kept for the next bucket of the same shape only."""
    key = (out, in_features, dtype, device.type)
    if key not in _OPERANDS:
        _OPERANDS.clear()
        g = torch.Generator(device="cpu").manual_seed(0)
        values = torch.randn(out, in_features // 2, generator=g).to(device=device, dtype=dtype)
        # any 2:4 pattern costs the same: keep positions 0 and 2 of every group (code 0b1000)
        meta = torch.full((out, in_features // GROUP_COLS), 0x8888 - 65536, dtype=torch.int16, device=device)
        _OPERANDS[key] = (decompress(values, meta), values, meta)
    return _OPERANDS[key]


def measure_sparse24(out: int, in_features: int, rows: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Time dense F.linear and sparse24_matmul once on random operands of this shape."""
    W, values, meta = _random_operands(out, in_features, dtype, device)
    x = torch.randn(rows, in_features, dtype=torch.float32).to(device=device, dtype=dtype)
    with torch.inference_mode():
        t_dense = _time(lambda: F.linear(x, W))
        t_sparse = _time(lambda: sparse24_matmul(x, values, meta))
    return {"dense_s": t_dense, "sparse24_s": t_sparse,
            "choice": "sparse24" if t_sparse <= MARGIN * t_dense else "dense"}


def choose_sparse24(out: int, in_features: int, rows: int, dtype: torch.dtype, device: torch.device | str) -> str:
    """"sparse24" or "dense" for this layer shape and batch: forced mode, else a cached one-time measurement."""
    mode = sparse24_mode()
    if mode != "auto":
        return mode
    device = torch.device(device)
    key = (out, in_features, batch_bucket(rows), dtype, device.type)
    rec = _CHOICES.get(key)
    if rec is None:
        rec = _CHOICES[key] = measure_sparse24(out, in_features, key[2], dtype, device)
        log.info("sparse24: %dx%d, %d rows, %s on %s: dense %.3f ms, 2:4 %.3f ms -> %s", out, in_features, key[2],
                 dtype, device.type, rec["dense_s"] * 1e3, rec["sparse24_s"] * 1e3, rec["choice"])
    return rec["choice"]


def sparse24_choices() -> dict[tuple, dict]:
    """The measurements made so far: (out, in, batch bucket, dtype, device type) -> times and choice."""
    return dict(_CHOICES)


def clear_sparse24_choices() -> None:
    _CHOICES.clear()
    _OPERANDS.clear()
    EPOCH[0] += 1
