"""Low-bit and 2:4 + low-bit inference for whole models: QuantLinear, Sparse24QuantLinear, swap_packed.

    packed = {"model.layers.0.mlp.up_proj": quant_pack(W, bits=4, group_size=128), ...}
    swap_packed(model, packed)            # those nn.Linear -> QuantLinear / Sparse24QuantLinear
    quantize_model(model, bits=4)         # or: RTN-pack every linear layer (2:4 ones as 2:4 + 4-bit)
    model.generate(...)                   # logits of the fake-quantized dense model, within bf16 rounding

A module keeps only the packed tensors (lmsqueeze.kernels.quant) and the bias as buffers, so its
state_dict is the packed form. Per call it asks `choose_quant` whether the packed kernel beats a
dense F.linear for its format, shape and batch on this device (one measurement per shape and batch
bucket, cached); where dense wins (large batches: prefill, scoring) it dequantizes its weight once
into the activations' dtype and keeps that copy (not a buffer, never saved): it trades memory for
never running slower than the dense model. `set_quant_mode("packed")` (or LMSQUEEZE_QUANT=packed)
keeps memory at the packed size instead; "dense" forces the dense copy. The packed kernels round 1..16
rows of x to int8 where that applies (lmsqueeze.kernels.quant, "Activations"); LMSQUEEZE_QUANT_ACT=fp32
keeps them exact.

The reference a quantized model must match is the fake-quantized dense model: every swapped layer's
weight replaced by dequantize(packed).to(dtype) (`fake_quantize_model`).
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from lmsqueeze import _ext
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.quant import (
    I8_MULTIPLE,
    MAX_GEMV_ROWS,
    QuantWeight,
    Sparse24QuantWeight,
    check_packed,
    check_sparse24_packed,
    dequantize,
    quant_act,
    quant_matmul,
    quant_pack,
    sparse24_quant_matmul,
    sparse24_quant_pack,
)
from lmsqueeze.kernels.sparse24 import batch_bucket, is_24

log = logging.getLogger("lmsqueeze")

MODES = ("auto", "dense", "packed")
MARGIN = 0.95  # the packed kernel is chosen only when it takes at most 95% of dense's time
_MODE: str | None = None
EPOCH = [0]
_CHOICES: dict[tuple, dict] = {}
_OPERANDS: dict[tuple, tuple] = {}
_CPU_DTYPES = (torch.float32, torch.bfloat16)


def set_quant_mode(mode: str | None) -> str | None:
    """Force "dense" or "packed" for every QuantLinear/Sparse24QuantLinear, or "auto"; None: back to env/auto."""
    global _MODE
    if mode is not None and mode not in MODES:
        raise LmsqueezeError(f"unknown quant mode '{mode}'; valid: {', '.join(MODES)}")
    prev, _MODE = _MODE, mode
    EPOCH[0] += 1
    return prev


def quant_mode() -> str:
    mode = _MODE or os.environ.get("LMSQUEEZE_QUANT") or "auto"
    if mode not in MODES:
        raise LmsqueezeError(f"LMSQUEEZE_QUANT='{mode}' is not a mode; valid: {', '.join(MODES)}")
    return mode


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


def _operands(fmt: tuple, out: int, cols: int, dtype, device):
    """Random (dense W, packed) for this format and shape; one shape kept at a time.

    The packed weight is random words, not quant_pack of W: the kernels read the same bytes whatever
    the codes, and packing a 32000x4096 head took a minute of the first generate on the dev machine."""
    key = (fmt, out, cols, dtype, device.type)
    if key not in _OPERANDS:
        _OPERANDS.clear()
        g = torch.Generator().manual_seed(0)
        kind, bits, gs = fmt
        ngroups = -(-cols // gs)
        scales = torch.rand(out, ngroups, generator=g) + 0.5
        zeros = torch.randint(0, 2 ** bits, (out, ngroups), generator=g, dtype=torch.int32).to(torch.uint8)
        if kind == "sparse24_quant":
            qvalues = torch.randint(-2 ** 31, 2 ** 31 - 1, (out, cols // 16), generator=g, dtype=torch.int32)
            # any 2:4 pattern reads the same bytes: keep positions 0 and 2 of every group (code 0b1000)
            meta = torch.full((out, cols // 16), 0x8888 - 65536, dtype=torch.int16)
            packed = Sparse24QuantWeight(qvalues, meta, scales, zeros, (out, cols), bits, gs, False)
        else:
            qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (out, -(-cols * bits // 32)), generator=g,
                                    dtype=torch.int32)
            packed = QuantWeight(qweight, scales, zeros, None, None, (out, cols), bits, gs, False)
        W = torch.randn(out, cols, generator=g).to(dtype)
        _OPERANDS[key] = (W.to(device), packed.to(device))
    return _OPERANDS[key]


def measure_quant(fmt: tuple, out: int, cols: int, rows: int, dtype, device) -> dict:
    """Time dense F.linear and the packed kernel once on random operands of this format and shape."""
    W, packed = _operands(fmt, out, cols, dtype, device)
    x = torch.randn(rows, cols).to(device=device, dtype=dtype)
    mm = sparse24_quant_matmul if fmt[0] == "sparse24_quant" else quant_matmul
    with torch.inference_mode():
        t_dense = _time(lambda: F.linear(x, W))
        t_packed = _time(lambda: mm(x, packed))
    return {"dense_s": t_dense, "packed_s": t_packed, "choice": "packed" if t_packed <= MARGIN * t_dense else "dense"}


def choose_quant(fmt: tuple, out: int, cols: int, rows: int, dtype, device) -> str:
    """"packed" or "dense" for this format (kind, bits, group_size), shape and batch: forced mode, else measured once."""
    mode = quant_mode()
    if mode != "auto":
        return mode
    device = torch.device(device)
    key = (fmt, out, cols, batch_bucket(rows), dtype, device.type, quant_act())
    rec = _CHOICES.get(key)
    if rec is None:
        rec = _CHOICES[key] = measure_quant(fmt, out, cols, key[3], dtype, device)
        log.info("quant %s: %dx%d, %d rows, %s on %s: dense %.3f ms, packed %.3f ms -> %s", fmt, out, cols, key[3],
                 dtype, device.type, rec["dense_s"] * 1e3, rec["packed_s"] * 1e3, rec["choice"])
    return rec["choice"]


def quant_choices() -> dict[tuple, dict]:
    return dict(_CHOICES)


def clear_quant_choices() -> None:
    _CHOICES.clear()
    _OPERANDS.clear()
    EPOCH[0] += 1


class _PackedLinear(nn.Module):
    """Shared forward: the dense-or-packed choice, the cached dense copy, the direct C++ call."""

    kind = ""
    _names: tuple[str, ...] = ()

    def _setup(self, tensors: dict, bias, shape, bits, group_size, sym, backend):
        self.out_features, self.in_features = shape
        self.bits, self.group_size, self.sym, self.backend = bits, group_size, sym, backend
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        self._dense: torch.Tensor | None = None
        self._dense_key: tuple | None = None
        self._choices: dict[tuple, str] = {}
        # int8 activations (lmsqueeze.kernels.quant, "Activations") fit this weight's shape
        self._i8_shape = bits == 4 and self.in_features % I8_MULTIPLE == 0 and group_size % I8_MULTIPLE == 0

    @property
    def packed(self):
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (materialized on each access; for inspection, not the hot path)."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return dequantize(self.packed, dtype)

    def _dense_weight(self, dtype) -> torch.Tensor:
        first = getattr(self, self._names[0])
        key = (first.data_ptr(), first._version, first.device, dtype)
        if self._dense is None or self._dense_key != key:
            self._dense, self._dense_key = dequantize(self.packed, dtype), key
        return self._dense

    def _choice(self, rows: int, dtype) -> str:
        key = (EPOCH[0], os.environ.get("LMSQUEEZE_QUANT"), os.environ.get("LMSQUEEZE_QUANT_ACT"), rows, dtype)
        choice = self._choices.get(key)
        if choice is None:
            if len(self._choices) > 64:
                self._choices.clear()
            fmt = (self.kind, self.bits, self.group_size)
            choice = self._choices[key] = choose_quant(fmt, self.out_features, self.in_features, rows, dtype,
                                                       self.scales.device)
        return choice

    def _direct(self, x: torch.Tensor) -> bool:
        return (self.backend is None and x.device.type == "cpu" and x.dim() >= 1 and x.shape[-1] == self.in_features
                and x.dtype in _CPU_DTYPES and _ext.has_op(f"{self.kind}_matmul_cpu")
                and not os.environ.get("LMSQUEEZE_BACKEND"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.backend is None and self._choice(rows, x.dtype) == "dense":
            return F.linear(x, self._dense_weight(x.dtype), bias)
        if self._direct(x):
            # the dispatcher's format checks cost tens of us a call; the C++ kernel checks shapes itself
            i8 = (rows <= MAX_GEMV_ROWS and self._i8_shape and quant_act() == "int8"
                  and _ext.ext().active_isa() != "generic")
            y = self._cpu(x.reshape(rows, self.in_features), bias, i8)
            return y.reshape(*x.shape[:-1], self.out_features)
        return self._matmul(x, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.kind} {self.bits}-bit g{self.group_size}{' sym' if self.sym else ''}")


class QuantLinear(_PackedLinear):
    """y = x @ W.T + b for a group-quantized W (QuantWeight); x may have any leading dimensions."""

    kind = "quant"
    _names = ("qweight", "scales", "zeros")

    def __init__(self, packed: QuantWeight, bias: torch.Tensor | None = None, backend: str | None = None):
        super().__init__()
        check_packed(packed)
        tensors = {"qweight": packed.qweight, "scales": packed.scales, "zeros": packed.zeros}
        self._setup(tensors, bias, packed.shape, packed.bits, packed.group_size, packed.sym, backend)
        self.register_buffer("g_idx", packed.g_idx)
        self.register_buffer("perm", packed.perm)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = False,
                    g_idx: torch.Tensor | None = None, backend: str | None = None) -> QuantLinear:
        """Round-to-nearest quantize an nn.Linear's weight and pack it."""
        with torch.no_grad():
            packed = quant_pack(linear.weight.detach(), bits=bits, group_size=group_size, sym=sym, g_idx=g_idx)
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, bias, backend=backend)

    @property
    def packed(self) -> QuantWeight:
        return QuantWeight(self.qweight, self.scales, self.zeros, self.g_idx, self.perm,
                           (self.out_features, self.in_features), self.bits, self.group_size, self.sym)

    def _cpu(self, x2, bias, i8: bool):
        return _ext.ext().quant_matmul_cpu(x2, self.qweight, self.scales, self.zeros, self.perm, self.in_features,
                                           self.bits, self.group_size, bias, i8)

    def _matmul(self, x, bias):
        return quant_matmul(x, self.packed, bias, backend=self.backend)


class Sparse24QuantLinear(_PackedLinear):
    """y = x @ W.T + b for a 2:4 W whose kept values are group-quantized (Sparse24QuantWeight)."""

    kind = "sparse24_quant"
    _names = ("qvalues", "meta", "scales", "zeros")

    def __init__(self, packed: Sparse24QuantWeight, bias: torch.Tensor | None = None, backend: str | None = None):
        super().__init__()
        check_sparse24_packed(packed)
        tensors = {"qvalues": packed.qvalues, "meta": packed.meta, "scales": packed.scales, "zeros": packed.zeros}
        self._setup(tensors, bias, packed.shape, packed.bits, packed.group_size, packed.sym, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128, sym: bool = False,
                    backend: str | None = None) -> Sparse24QuantLinear:
        """Compress an exactly 2:4 nn.Linear and round-to-nearest quantize its kept values."""
        with torch.no_grad():
            packed = sparse24_quant_pack(linear.weight.detach(), bits=bits, group_size=group_size, sym=sym)
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, bias, backend=backend)

    @property
    def packed(self) -> Sparse24QuantWeight:
        return Sparse24QuantWeight(self.qvalues, self.meta, self.scales, self.zeros,
                                   (self.out_features, self.in_features), self.bits, self.group_size, self.sym)

    def _cpu(self, x2, bias, i8: bool):
        return _ext.ext().sparse24_quant_matmul_cpu(x2, self.qvalues, self.meta, self.scales, self.zeros, self.bits,
                                                    self.group_size, bias, i8)

    def _matmul(self, x, bias):
        return sparse24_quant_matmul(x, self.packed, bias, backend=self.backend)


# ---- whole models ---------------------------------------------------------------------------------
def _tied_weight_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _linears(model: nn.Module):
    """(qualified name, parent, attribute, nn.Linear) for every plain, untied nn.Linear."""
    shared = _tied_weight_ids(model)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and id(child.weight) not in shared:
                yield (f"{parent_name}.{name}" if parent_name else name), parent, name, child


def swap_packed(model: nn.Module, packed: dict[str, QuantWeight | Sparse24QuantWeight],
                backend: str | None = None) -> list[str]:
    """Replace, in place, the nn.Linear named by each key with a QuantLinear / Sparse24QuantLinear built from
    its packed weight (the Linear's bias is kept, in the Linear's dtype). Returns the swapped names.

    The packed weights must match the layers' shapes; a name that is not an nn.Linear of the model raises.
    Layers on the meta device (a skeleton from `torch.device("meta")`, no dense weights ever allocated)
    take the packed tensors on their own device and no bias."""
    layers = {name: (parent, attr, child) for name, parent, attr, child in _linears(model)}
    missing = [n for n in packed if n not in layers]
    if missing:
        raise LmsqueezeError(f"{len(missing)} packed weight(s) name no plain nn.Linear of the model, first "
                             f"'{missing[0]}'; linear layers are e.g. {sorted(layers)[:3]}")
    swapped = []
    for name, p in packed.items():
        parent, attr, child = layers[name]
        if tuple(p.shape) != (child.out_features, child.in_features):
            raise LmsqueezeError(f"packed weight for '{name}' is {tuple(p.shape)} but the layer is "
                                 f"[{child.out_features}, {child.in_features}]")
        if child.weight.device.type == "meta":
            # a skeleton built without weights (loading with no dense copy): the packed tensors stay where
            # they are; a bias must then come with the checkpoint (set module.bias after the swap)
            device, bias = p.scales.device, None
        else:
            device = child.weight.device
            bias = None if child.bias is None else child.bias.detach().clone()
        cls = Sparse24QuantLinear if isinstance(p, Sparse24QuantWeight) else QuantLinear
        setattr(parent, attr, cls(p.to(device), bias, backend=backend))
        swapped.append(name)
    log.info("swap_packed: %d linear layer(s) now packed", len(swapped))
    return swapped


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, sym: bool = False,
                   sparse24: bool = True, skip: tuple[str, ...] = ("lm_head",), backend: str | None = None) -> list[str]:
    """RTN-pack every plain nn.Linear (names containing a `skip` entry stay dense); with sparse24, layers
    whose weight is exactly 2:4 become Sparse24QuantLinear. Returns the swapped names."""
    packed = {}
    for name, _, _, child in _linears(model):
        if any(s in name for s in skip):
            continue
        W = child.weight.detach()
        if sparse24 and bits == 4 and is_24(W) and (group_size == -1 or group_size % 16 == 0):
            packed[name] = sparse24_quant_pack(W, bits=bits, group_size=group_size, sym=sym)
        else:
            packed[name] = quant_pack(W, bits=bits, group_size=group_size, sym=sym)
    return swap_packed(model, packed, backend=backend)


@torch.no_grad()
def fake_quantize_model(model: nn.Module) -> list[str]:
    """Swap every QuantLinear / Sparse24QuantLinear back to an nn.Linear holding its dequantized weight in the
    bias's dtype (or the model's parameter dtype): the dense model the packed one must match."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    names = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _PackedLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device=child.scales.device, dtype=dtype)
                lin.weight.copy_(dequantize(child.packed, dtype))
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
                setattr(parent, name, lin)
                names.append(f"{parent_name}.{name}" if parent_name else name)
    return names
