"""Weight-only low-bit matmul (4-bit and 8-bit, group-wise) and 2:4 + 4-bit: packed formats and kernels.

Grid
----
Each output row n and group g of input columns has a scale s[n, g] > 0 and an integer zero point
z[n, g] in [0, maxq] (maxq = 2^bits - 1); an integer code q in [0, maxq] stands for

    w = s[n, g] * (q - z[n, g])

the grid of GPTQ and RTN (lmsqueeze.kernels.obs.find_params / quantize). Symmetric grids have
z = (maxq + 1) / 2 everywhere (8 for 4-bit, 128 for 8-bit); asymmetric grids have any z.

Packed dense weight: `QuantWeight`
----------------------------------
W [out, in], `group_size` columns a group (-1: one group per row); ngroups = ceil(in / group_size),
the last group is shorter when group_size does not divide in. Optional act-order `g_idx` [in]
(int32) maps input column k -> its group; it must give every group exactly group_size columns
(the last one the remainder), as GPTQ's act-order does. Without g_idx, column k is in group
k // group_size.

- perm [in] int64 or None: the packed ("kernel") column order. Packed column j holds input column
  perm[j]; perm is the stable argsort of g_idx, so the groups are consecutive in packed order
  (packed column j is in group j // group_size). None when that order is the identity.
- qweight [out, ceil(in * bits / 32)] int32: the codes in packed column order, row-major,
  32 / bits codes per word (8 for 4-bit, 4 for 8-bit), little-endian: packed column j of row n sits
  in word j // (32 / bits) at bits [bits * (j % (32/bits)), + bits). A row's last word is padded
  with zero codes. Read the words as unsigned. On a little-endian machine this is also a byte
  stream: 4-bit column j is the low (j even) or high (j odd) nibble of byte j // 2; 8-bit column j
  is byte j. This is the row layout of compressed-tensors' pack-quantized `weight_packed`.
- scales [out, ngroups] float32 (exact for bf16/fp16 checkpoint scales; 4 bytes per group, 3% of a
  4-bit g128 weight's traffic).
- zeros [out, ngroups] uint8, in [0, maxq].

Bytes per weight (4-bit, g128): 0.5 + 5/128 = 0.54; bf16 dense reads 2.

Packed 2:4 + 4-bit weight: `Sparse24QuantWeight`
------------------------------------------------
W [out, in] exactly 2:4 (in % 16 == 0), compressed as in lmsqueeze.kernels.sparse24
(values [out, in/2] = the kept pair of each group of 4 columns, meta [out, in/16] int16), then the
kept values quantized:

- qvalues [out, in/16] int32: 4-bit codes of values[n, :], 8 per word, little-endian as above
  (value v of row n is nibble v % 8 of word v // 8).
- meta [out, in/16] int16: exactly sparse24's metadata.
- scales [out, ngroups] float32, zeros [out, ngroups] uint8: groups of `group_size` input
  columns (a multiple of 16), i.e. group_size / 2 kept values; the last group may be shorter.

The grid of a group is find_params over its kept values; since find_params' range always contains
0, that is the same grid RTN puts on the dense-with-zeros weight, and zeros stay exact.
Bytes per weight (g128): 0.25 codes + 0.125 meta + 5/128 = 0.41.

Ops
---
    y = x @ dequantize(packed).T + bias      (quant_matmul / sparse24_quant_matmul, any batch)

`*_ref` (dequantize in fp32 + F.linear in fp32) is the oracle. `cpu`: csrc/cpu/quant.cpp, which
reads each packed weight once for 1..16 rows of x (codes unpacked in registers; see its header) and
dequantizes tiles for the dense GEMM above 16 rows. `triton`: kernels that unpack in registers
(lmsqueeze/kernels/triton/quant.py), checked under TRITON_INTERPRET=1.

Activations: `act`
------------------
"fp32": exact, x in fp32 against the dequantized weight (only the summation order differs from the
reference). "int8": the 1..16-row C++ kernels round x to int8 per block of 32 columns (in the packed
column order; scale = the block's max |x| / 127, round half to even) and take integer dot products
with the 4-bit codes, as llama.cpp's Q4_0 x Q8_0 does; the result is exactly the reference of that
rounded x (`quantize_act_int8`), up to fp32 summation. On SmolLM2's own weights and activations the
rounding moves a layer's output by ~0.5% of its norm, an order below what 4-bit weights themselves do
(docs/benchmarks.md, issue 19). It applies where `int8_act_applies` says (C++ backend, 4-bit, in and
group size multiples of 64, at most 16 rows, an AVX2 CPU); elsewhere the exact path runs. The default
is "int8"; `act="fp32"` or LMSQUEEZE_QUANT_ACT=fp32 keeps every call exact.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmsqueeze import _ext
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels._dispatch import BACKENDS, choose_backend
from lmsqueeze.kernels.obs import QuantSpec, find_params
from lmsqueeze.kernels.sparse24 import GROUP_COLS, _positions, check_24
from lmsqueeze.kernels.sparse24 import compress as _compress24

IMPLEMENTED = ("ref", "cpu", "triton")
QUANT_BITS = (4, 8)
SPARSE24_BITS = (4,)
_CPU_DTYPES = (torch.float32, torch.bfloat16)
ACTS = ("fp32", "int8")
ACT_BLOCK = 32          # columns of x per int8 scale
I8_MULTIPLE = 64        # the int8 kernels take 64 columns a step: in and group_size must be multiples
MAX_GEMV_ROWS = 16      # the C++ kernels' read-once path; more rows dequantize tiles for the dense GEMM
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- formats --------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A group-quantized dense weight [out, in]; layout in the module docstring."""

    qweight: torch.Tensor          # int32 [out, ceil(in * bits / 32)]
    scales: torch.Tensor           # float32 [out, ngroups]
    zeros: torch.Tensor            # uint8 [out, ngroups]
    g_idx: torch.Tensor | None     # int32 [in] or None
    perm: torch.Tensor | None      # int64 [in] or None
    shape: tuple[int, int]
    bits: int
    group_size: int                # the effective size (in when -1 was asked)
    sym: bool

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def ngroups(self) -> int:
        return self.scales.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        d = {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}
        if self.g_idx is not None:
            d["g_idx"] = self.g_idx
        if self.perm is not None:
            d["perm"] = self.perm
        return d

    def nbytes(self) -> int:
        """Bytes a matmul reads (qweight + scales + zeros; perm/g_idx are per column, not per weight)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def to(self, device) -> QuantWeight:
        def move(t):
            return None if t is None else t.to(device)

        return QuantWeight(move(self.qweight), move(self.scales), move(self.zeros), move(self.g_idx),
                           move(self.perm), self.shape, self.bits, self.group_size, self.sym)


@dataclass(frozen=True, eq=False)
class Sparse24QuantWeight:
    """An exactly 2:4 weight [out, in] with its kept values group-quantized; layout in the module docstring."""

    qvalues: torch.Tensor          # int32 [out, in/16]
    meta: torch.Tensor             # int16 [out, in/16]
    scales: torch.Tensor           # float32 [out, ngroups]
    zeros: torch.Tensor            # uint8 [out, ngroups]
    shape: tuple[int, int]
    bits: int
    group_size: int
    sym: bool

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qvalues": self.qvalues, "meta": self.meta, "scales": self.scales, "zeros": self.zeros}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> Sparse24QuantWeight:
        return Sparse24QuantWeight(self.qvalues.to(device), self.meta.to(device), self.scales.to(device),
                                   self.zeros.to(device), self.shape, self.bits, self.group_size, self.sym)


# ---- bit packing ----------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [rows, cols] (integers in [0, 2^bits)) -> int32 words [rows, ceil(cols * bits / 32)], little-endian."""
    per = 32 // bits
    rows, cols = codes.shape
    nw = -(-cols // per)
    c = torch.zeros(rows, nw * per, dtype=torch.int64, device=codes.device)
    c[:, :cols] = codes.to(torch.int64)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=codes.device)
    words = (c.reshape(rows, nw, per) << shifts).sum(-1)                   # 0 .. 2^32 - 1
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()


def unpack_codes(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """int32 words [rows, nw] -> codes [rows, cols] int64 (the inverse of pack_codes)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=words.device)
    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = (w.unsqueeze(-1) >> shifts) & (2 ** bits - 1)                # [rows, nw, 32 / bits]
    return codes.reshape(words.shape[0], -1)[:, :cols]


# ---- checks ---------------------------------------------------------------------------------------
def _check_bits(bits: int, valid=QUANT_BITS) -> None:
    if bits not in valid:
        raise LmsqueezeError(f"bits={bits} is not supported by the packed kernels; valid: "
                             f"{', '.join(map(str, valid))}")


def _group_size(group_size: int, cols: int) -> int:
    if group_size == -1:
        return cols
    if not isinstance(group_size, int) or group_size < 1:
        raise LmsqueezeError(f"group_size={group_size} is invalid; valid: -1 (one group per row) or >= 1")
    return min(group_size, cols) if cols else group_size


def _perm_from_g_idx(g_idx: torch.Tensor | None, cols: int, gs: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(g_idx int32 or None, perm int64 or None); raises unless g_idx gives every group exactly gs columns."""
    if g_idx is None:
        return None, None
    if g_idx.dim() != 1 or g_idx.shape[0] != cols or g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool:
        raise LmsqueezeError(f"g_idx must be an integer tensor [in={cols}] mapping input column -> group, got "
                             f"{tuple(g_idx.shape)} {g_idx.dtype}")
    g_idx = g_idx.to(torch.int64)
    ngroups = -(-cols // gs)
    if cols and (int(g_idx.min()) < 0 or int(g_idx.max()) >= ngroups):
        raise LmsqueezeError(f"g_idx values must lie in [0, {ngroups}) for {cols} columns in groups of {gs}; "
                             f"got [{int(g_idx.min())}, {int(g_idx.max())}]")
    counts = torch.bincount(g_idx, minlength=ngroups)
    want = torch.full((ngroups,), gs, dtype=counts.dtype, device=counts.device)
    if ngroups:
        want[-1] = cols - gs * (ngroups - 1)
    if not torch.equal(counts, want):
        bad = int((counts != want).nonzero()[0])
        raise LmsqueezeError(f"g_idx puts {int(counts[bad])} columns in group {bad}; every group must have exactly "
                             f"group_size={gs} columns (the last {int(want[-1])}), as GPTQ act-order produces")
    perm = torch.sort(g_idx, stable=True).indices
    identity = torch.equal(perm, torch.arange(cols, device=perm.device))
    return g_idx.to(torch.int32), (None if identity else perm)


def _check_grid(scales, zeros, out, ngroups, bits, what="") -> tuple[torch.Tensor, torch.Tensor]:
    if scales.shape != (out, ngroups) or zeros.shape != (out, ngroups):
        raise LmsqueezeError(f"{what}scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must both be "
                             f"[out={out}, ngroups={ngroups}]")
    if not scales.dtype.is_floating_point:
        raise LmsqueezeError(f"{what}scales must be floating point, got {scales.dtype}")
    zf = zeros.double()
    if zeros.numel() and (not torch.equal(zf, zf.round()) or zf.min() < 0 or zf.max() > 2 ** bits - 1):
        raise LmsqueezeError(f"{what}zeros must be integers in [0, {2 ** bits - 1}] for {bits}-bit codes, got "
                             f"values in [{float(zf.min())}, {float(zf.max())}]")
    s = scales.float()
    if s.numel() and not bool(torch.isfinite(s).all()):
        raise LmsqueezeError(f"{what}scales hold non-finite values")
    return s.contiguous(), zeros.round().to(torch.uint8).contiguous()


def _check_codes(codes, bits, shape) -> None:
    if codes.shape != shape:
        raise LmsqueezeError(f"codes must be {tuple(shape)}, got {tuple(codes.shape)}")
    if codes.dtype.is_floating_point:
        cf = codes.double()
        if codes.numel() and not torch.equal(cf, cf.round()):
            raise LmsqueezeError("codes must be integers (the solver's grid), got fractional values")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2 ** bits - 1):
        raise LmsqueezeError(f"codes must lie in [0, {2 ** bits - 1}] for bits={bits}, got "
                             f"[{int(codes.min())}, {int(codes.max())}]")


# ---- dense low-bit: pack, dequantize ----------------------------------------------------------------
def quant_grid(W: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Round-to-nearest grid of W [rows, cols] in groups of consecutive columns (last one shorter):
    (codes [rows, cols] int64, scales [rows, ngroups] fp32, zeros [rows, ngroups] fp32)."""
    spec = QuantSpec(bits=bits, group_size=-1, sym=sym)
    rows, cols = W.shape
    W = W.float()
    full = cols // group_size
    scales, zeros = [], []
    if full:
        s, z = find_params(W[:, :full * group_size].reshape(rows * full, group_size), spec)
        scales.append(s.reshape(rows, full))
        zeros.append(z.reshape(rows, full))
    if cols % group_size:
        s, z = find_params(W[:, full * group_size:], spec)
        scales.append(s)
        zeros.append(z)
    scales = torch.cat(scales, 1) if scales else W.new_zeros(rows, 0)
    zeros = torch.cat(zeros, 1) if zeros else W.new_zeros(rows, 0)
    idx = torch.arange(cols, device=W.device) // group_size
    codes = torch.clamp(torch.round(W / scales[:, idx]) + zeros[:, idx], 0, spec.maxq).to(torch.int64)
    return codes, scales, zeros


def quant_pack(W: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False,
               g_idx: torch.Tensor | None = None) -> QuantWeight:
    """Put W [out, in] on the round-to-nearest grid (obs.find_params per group) and pack it.

    g_idx (act-order): input column -> group; each group's grid is computed over its own columns."""
    if W.dim() != 2 or not W.dtype.is_floating_point:
        raise LmsqueezeError(f"W must be a 2-D float weight [out, in], got {tuple(W.shape)} {W.dtype}")
    _check_bits(bits)
    out, cols = W.shape
    gs = _group_size(group_size, cols)
    g_idx, perm = _perm_from_g_idx(g_idx, cols, gs)
    Wp = W if perm is None else W[:, perm]
    codes, scales, zeros = quant_grid(Wp, bits, gs, sym)
    return _make(codes, scales, zeros, g_idx, perm, (out, cols), bits, gs, sym)


def quant_pack_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                     g_idx: torch.Tensor | None = None) -> QuantWeight:
    """Pack an already-solved grid (GPTQ/RTN) without re-rounding anything.

    codes [out, in] integers in [0, 2^bits) in input-column order; scales, zeros [out, ngroups];
    group of column k: g_idx[k] if given, else k // group_size. Dequantizes to
    scales[n, g] * (codes[n, k] - zeros[n, g]) exactly (scales are kept as fp32)."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise LmsqueezeError(f"codes must be 2-D [out, in], got {tuple(codes.shape)}")
    out, cols = codes.shape
    _check_codes(codes, bits, (out, cols))
    gs = _group_size(group_size, cols)
    ngroups = -(-cols // gs)
    s, z = _check_grid(scales, zeros, out, ngroups, bits)
    g_idx, perm = _perm_from_g_idx(g_idx, cols, gs)
    sym = bool((z == 2 ** (bits - 1)).all())
    cp = codes if perm is None else codes[:, perm]
    return _make(cp, s, z, g_idx, perm, (out, cols), bits, gs, sym)


def _make(codes, scales, zeros, g_idx, perm, shape, bits, gs, sym) -> QuantWeight:
    return QuantWeight(qweight=pack_codes(codes, bits), scales=scales.float().contiguous(),
                       zeros=zeros.round().to(torch.uint8).contiguous(), g_idx=g_idx, perm=perm,
                       shape=tuple(shape), bits=bits, group_size=gs, sym=sym)


def check_packed(p: QuantWeight) -> None:
    """Raise naming the first inconsistency between a QuantWeight's tensors and its shape/bits/group_size."""
    if not isinstance(p, QuantWeight):
        raise LmsqueezeError(f"expected a QuantWeight (from quant_pack), got {type(p).__name__}")
    _check_bits(p.bits)
    out, cols = p.shape
    nw = -(-cols * p.bits // 32)
    if p.qweight.dtype != torch.int32 or p.qweight.shape != (out, nw):
        raise LmsqueezeError(f"qweight must be int32 [out={out}, ceil(in*bits/32)={nw}] for a {p.bits}-bit "
                             f"[{out}, {cols}] weight, got {tuple(p.qweight.shape)} {p.qweight.dtype}")
    ngroups = -(-cols // p.group_size) if p.group_size > 0 else -1
    if p.scales.dtype != torch.float32 or p.zeros.dtype != torch.uint8:
        raise LmsqueezeError(f"scales must be float32 and zeros uint8, got {p.scales.dtype} and {p.zeros.dtype}")
    if p.scales.shape != (out, ngroups) or p.zeros.shape != (out, ngroups):
        raise LmsqueezeError(f"scales {tuple(p.scales.shape)} and zeros {tuple(p.zeros.shape)} must be "
                             f"[out={out}, ngroups={ngroups}] (group_size={p.group_size}, in={cols})")
    if p.perm is not None and (p.perm.shape != (cols,) or p.perm.dtype != torch.int64):
        raise LmsqueezeError(f"perm must be int64 [in={cols}], got {tuple(p.perm.shape)} {p.perm.dtype}")


def dequantize(p: QuantWeight | Sparse24QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight [out, in] the packed form stands for: s * (q - z), computed in fp32, then cast."""
    if isinstance(p, Sparse24QuantWeight):
        return _sparse24_dequantize(p, dtype)
    check_packed(p)
    cols = p.in_features
    codes = unpack_codes(p.qweight, p.bits, cols)
    grp = torch.arange(cols, device=codes.device) // p.group_size
    Wp = (codes.float() - p.zeros.float()[:, grp]) * p.scales[:, grp]
    if p.perm is None:
        return Wp.to(dtype)
    W = torch.empty_like(Wp)
    W[:, p.perm] = Wp
    return W.to(dtype)


# ---- 2:4 + 4-bit: pack, dequantize -----------------------------------------------------------------
def _s24_group_size(group_size: int, cols: int) -> int:
    gs = cols if group_size == -1 else group_size
    if not isinstance(gs, int) or gs < GROUP_COLS or gs % GROUP_COLS:
        raise LmsqueezeError(f"group_size={group_size} is invalid for 2:4 + low-bit: it must be -1 or a multiple of "
                             f"{GROUP_COLS} input columns (one metadata word)")
    return min(gs, cols) if cols else gs


def sparse24_quant_pack(W: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False) -> Sparse24QuantWeight:
    """Compress an exactly 2:4 W [out, in] (sparse24.compress) and put its kept values on the RTN grid."""
    _check_bits(bits, SPARSE24_BITS)
    if W.dim() != 2 or not W.dtype.is_floating_point:
        raise LmsqueezeError(f"W must be a 2-D float weight [out, in], got {tuple(W.shape)} {W.dtype}")
    check_24(W)
    out, cols = W.shape
    gs = _s24_group_size(group_size, cols)
    values, meta = _compress24(W.float())
    codes, scales, zeros = quant_grid(values, bits, gs // 2, sym)    # groups of gs/2 kept values
    return Sparse24QuantWeight(qvalues=pack_codes(codes, bits), meta=meta, scales=scales.contiguous(),
                               zeros=zeros.to(torch.uint8).contiguous(), shape=(out, cols), bits=bits,
                               group_size=gs, sym=sym)


def sparse24_quant_pack_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                              group_size: int) -> Sparse24QuantWeight:
    """Pack a solved grid (codes [out, in], scales/zeros [out, ngroups]) whose dequantized weight is 2:4:
    pruned entries must carry their group's zero point as code (they dequantize to exactly 0)."""
    _check_bits(bits, SPARSE24_BITS)
    if codes.dim() != 2:
        raise LmsqueezeError(f"codes must be 2-D [out, in], got {tuple(codes.shape)}")
    out, cols = codes.shape
    _check_codes(codes, bits, (out, cols))
    gs = _s24_group_size(group_size, cols)
    ngroups = -(-cols // gs)
    s, z = _check_grid(scales, zeros, out, ngroups, bits)
    grp = torch.arange(cols, device=codes.device) // gs
    nonzero = codes.to(torch.int64) != z.to(torch.int64)[:, grp]
    check_24(nonzero.float())
    _, meta = _compress24(nonzero.float())
    pos = _positions(meta)                                                  # [out, in/4, 2]
    kept = codes.to(torch.int64).reshape(out, cols // 4, 4).gather(-1, pos).reshape(out, cols // 2)
    return Sparse24QuantWeight(qvalues=pack_codes(kept, bits), meta=meta, scales=s, zeros=z, shape=(out, cols),
                               bits=bits, group_size=gs, sym=bool((z == 2 ** (bits - 1)).all()))


def check_sparse24_packed(p: Sparse24QuantWeight) -> None:
    if not isinstance(p, Sparse24QuantWeight):
        raise LmsqueezeError(f"expected a Sparse24QuantWeight (from sparse24_quant_pack), got {type(p).__name__}")
    _check_bits(p.bits, SPARSE24_BITS)
    out, cols = p.shape
    if cols % GROUP_COLS or p.group_size % GROUP_COLS:
        raise LmsqueezeError(f"a 2:4 + 4-bit weight needs in ({cols}) and group_size ({p.group_size}) to be "
                             f"multiples of {GROUP_COLS}")
    if p.qvalues.dtype != torch.int32 or p.qvalues.shape != (out, cols // 16):
        raise LmsqueezeError(f"qvalues must be int32 [out={out}, in/16={cols // 16}], got "
                             f"{tuple(p.qvalues.shape)} {p.qvalues.dtype}")
    if p.meta.dtype != torch.int16 or p.meta.shape != (out, cols // 16):
        raise LmsqueezeError(f"meta must be int16 [out={out}, in/16={cols // 16}], got {tuple(p.meta.shape)} "
                             f"{p.meta.dtype}")
    ngroups = -(-cols // p.group_size)
    if p.scales.dtype != torch.float32 or p.zeros.dtype != torch.uint8 or p.scales.shape != (out, ngroups) \
            or p.zeros.shape != (out, ngroups):
        raise LmsqueezeError(f"scales (float32) and zeros (uint8) must be [out={out}, ngroups={ngroups}], got "
                             f"{tuple(p.scales.shape)} {p.scales.dtype} and {tuple(p.zeros.shape)} {p.zeros.dtype}")


def _sparse24_dequantize(p: Sparse24QuantWeight, dtype) -> torch.Tensor:
    check_sparse24_packed(p)
    out, cols = p.shape
    codes = unpack_codes(p.qvalues, p.bits, cols // 2)                      # [out, in/2]
    grp = torch.arange(cols // 2, device=codes.device) // (p.group_size // 2)
    values = (codes.float() - p.zeros.float()[:, grp]) * p.scales[:, grp]
    W = torch.zeros(out, cols // 4, 4, dtype=torch.float32, device=codes.device)
    W.scatter_(-1, _positions(p.meta), values.reshape(out, cols // 4, 2))
    return W.reshape(out, cols).to(dtype)


# ---- activations ----------------------------------------------------------------------------------
def quant_act() -> str:
    """The default `act`: LMSQUEEZE_QUANT_ACT if set ("fp32" or "int8"), else "int8"."""
    act = os.environ.get("LMSQUEEZE_QUANT_ACT") or "int8"
    if act not in ACTS:
        raise LmsqueezeError(f"LMSQUEEZE_QUANT_ACT='{act}' is not an activation mode; valid: {', '.join(ACTS)}")
    return act


def _check_act(act: str | None) -> str:
    if act is None:
        return quant_act()
    if act not in ACTS:
        raise LmsqueezeError(f"act='{act}' is not an activation mode; valid: {', '.join(ACTS)}")
    return act


def int8_act_applies(packed: QuantWeight | Sparse24QuantWeight, rows: int, backend: str = "cpu") -> bool:
    """Whether act="int8" rounds x for this weight, number of rows and backend (else the exact path runs)."""
    if backend != "cpu" or packed.bits != 4 or rows > MAX_GEMV_ROWS:
        return False
    if packed.in_features % I8_MULTIPLE or packed.group_size % I8_MULTIPLE:
        return False
    return _ext.ext() is not None and _ext.ext().active_isa() != "generic"


def quantize_act_int8(x: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] (in % 32 == 0) rounded as the int8 kernels round it, returned in fp32 and in x's column
    order: per block of ACT_BLOCK consecutive columns of x[:, perm] (the packed order), d = max |x| / 127
    (fp32), x ~= d * clamp(round_half_even(x / d), -127, 127); d = 0 gives 0. Source: llama.cpp's Q8_0 block
    quantization (ggml-quants.c), here over the packed column order."""
    rows, cols = x.shape
    if cols % ACT_BLOCK:
        raise LmsqueezeError(f"int8 activations round blocks of {ACT_BLOCK} columns; in={cols} is not a multiple")
    xp = x.float() if perm is None else x.float()[:, perm]
    b = xp.reshape(rows, cols // ACT_BLOCK, ACT_BLOCK)
    d = b.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(b / torch.where(d > 0, d, 1.0)).clamp(-127, 127), 0.0)
    xh = (q * d).reshape(rows, cols)
    if perm is None:
        return xh
    out = torch.empty_like(xh)
    out[:, perm] = xh
    return out


# ---- matmul ---------------------------------------------------------------------------------------
def quant_matmul_ref(x: torch.Tensor, packed: QuantWeight, bias: torch.Tensor | None = None,
                     act: str = "fp32") -> torch.Tensor:
    """Reference: dequantize in fp32, F.linear in fp32 (of x rounded by quantize_act_int8 when act="int8"),
    cast back to x's dtype. x [..., in]."""
    _check_act(act)
    xf = x.float()
    if act == "int8":
        xf = quantize_act_int8(xf.reshape(-1, xf.shape[-1]), packed.perm).reshape(xf.shape)
    y = F.linear(xf, dequantize(packed), None if bias is None else bias.float())
    return y.to(x.dtype)


def sparse24_quant_matmul_ref(x: torch.Tensor, packed: Sparse24QuantWeight,
                              bias: torch.Tensor | None = None, act: str = "fp32") -> torch.Tensor:
    """Reference: dequantize (2:4 dense-with-zeros) in fp32, F.linear in fp32 (of x rounded by
    quantize_act_int8 when act="int8"), cast back to x's dtype."""
    _check_act(act)
    xf = x.float()
    if act == "int8":
        xf = quantize_act_int8(xf.reshape(-1, xf.shape[-1])).reshape(xf.shape)
    y = F.linear(xf, dequantize(packed), None if bias is None else bias.float())
    return y.to(x.dtype)


def _check_x(op, x, packed, bias) -> None:
    out, cols = packed.shape
    if x.dim() < 1 or x.shape[-1] != cols:
        raise LmsqueezeError(f"{op}: x's last dimension ({tuple(x.shape)}) must equal the weight's input width {cols}")
    if x.dtype not in _X_DTYPES:
        raise LmsqueezeError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    dev = packed.scales.device
    if x.device != dev:
        raise LmsqueezeError(f"{op}: x is on {x.device} but the packed weight is on {dev}")
    if bias is not None and (bias.shape != (out,) or bias.device != x.device):
        raise LmsqueezeError(f"{op}: bias must be [{out}] on {x.device}, got {tuple(bias.shape)} on {bias.device}")


def _pick(op: str, x: torch.Tensor, backend: str | None) -> str:
    forced = backend or os.environ.get(f"LMSQUEEZE_BACKEND_{op.upper()}") or os.environ.get("LMSQUEEZE_BACKEND")
    if forced == "cuda":  # no CUDA C++ kernel: the Triton one serves CUDA tensors
        forced = "triton"
    if forced is not None and forced not in BACKENDS:
        raise LmsqueezeError(f"unknown backend '{forced}'; valid: {', '.join(BACKENDS)}")
    if x.device.type == "cuda" and forced is None:
        chosen = choose_backend(op, x.device, "triton", IMPLEMENTED) if _triton_ok(x) else "ref"
    else:
        chosen = choose_backend(op, x.device, forced, IMPLEMENTED)
    if chosen == "cpu" and x.dtype not in _CPU_DTYPES:
        if forced:
            raise LmsqueezeError(f"backend 'cpu' runs {op} on float32 and bfloat16 x, got {x.dtype}")
        return "ref"  # fp16 on CPU: no C++ path (the CPU has no fast fp16 arithmetic anyway)
    return chosen


def _triton_ok(x) -> bool:
    from lmsqueeze.kernels._dispatch import why_unavailable

    return why_unavailable("quant_matmul", "triton", x.device) is None


def quant_matmul(x: torch.Tensor, packed: QuantWeight, bias: torch.Tensor | None = None,
                 backend: str | None = None, act: str | None = None) -> torch.Tensor:
    """y [..., out] = x [..., in] @ dequantize(packed).T + bias, in x's dtype.

    backend: None (auto: C++ on CPU, Triton on CUDA), "ref", "cpu" or "triton"; LMSQUEEZE_BACKEND
    (or LMSQUEEZE_BACKEND_QUANT_MATMUL) forces one too. act: "int8" or "fp32" (module docstring;
    None: quant_act()); "int8" changes the result only where int8_act_applies."""
    check_packed(packed)
    _check_x("quant_matmul", x, packed, bias)
    act = _check_act(act)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    bias = None if bias is None else bias.to(x.dtype)
    chosen = _pick("quant_matmul", x, backend)
    if chosen == "cpu":
        i8 = act == "int8" and int8_act_applies(packed, x2.shape[0])
        y = _ext.ext().quant_matmul_cpu(x2, packed.qweight, packed.scales, packed.zeros, packed.perm,
                                        packed.in_features, packed.bits, packed.group_size, bias, i8)
    elif chosen == "triton":
        from lmsqueeze.kernels.triton.quant import quant_matmul_triton

        y = quant_matmul_triton(x2, packed, bias)
    else:
        y = quant_matmul_ref(x2, packed, bias)
    return y.reshape(*lead, packed.out_features)


def sparse24_quant_matmul(x: torch.Tensor, packed: Sparse24QuantWeight, bias: torch.Tensor | None = None,
                          backend: str | None = None, act: str | None = None) -> torch.Tensor:
    """y [..., out] = x [..., in] @ dequantize(packed).T + bias for a 2:4 + 4-bit weight, in x's dtype.

    backend and act as in quant_matmul."""
    check_sparse24_packed(packed)
    _check_x("sparse24_quant_matmul", x, packed, bias)
    act = _check_act(act)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    bias = None if bias is None else bias.to(x.dtype)
    chosen = _pick("sparse24_quant_matmul", x, backend)
    if chosen == "cpu":
        i8 = act == "int8" and int8_act_applies(packed, x2.shape[0])
        y = _ext.ext().sparse24_quant_matmul_cpu(x2, packed.qvalues, packed.meta, packed.scales, packed.zeros,
                                                 packed.bits, packed.group_size, bias, i8)
    elif chosen == "triton":
        from lmsqueeze.kernels.triton.quant import sparse24_quant_matmul_triton

        y = sparse24_quant_matmul_triton(x2, packed, bias)
    else:
        y = sparse24_quant_matmul_ref(x2, packed, bias)
    return y.reshape(*lead, packed.out_features)
