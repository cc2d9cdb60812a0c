"""2:4 sparse inference for whole models: SparseLinear, sparsify_model, load_sparse.

    model, tok = load_model("smollm2-135m", dtype="bf16")   # already pruned to 2:4 (exact zeros)
    swapped = sparsify_model(model)                         # every exactly-2:4 Linear/Conv1D -> SparseLinear
    model.generate(...)                                     # same logits as the dense-with-zeros model

A SparseLinear keeps only the compressed weight (values + meta, lmsqueeze.kernels.sparse24) and the
bias as buffers, so a state_dict holds the packed form. Per call it asks `choose_sparse24` whether
2:4 beats dense for its shape and batch on this device (one measurement per shape and batch
bucket, cached); where dense wins it decompresses its weight once and keeps that copy (not a
buffer, never saved), trading memory for never running slower than the dense model.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from lmsqueeze import _ext
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.kernels.sparse24 import (
    _CPU_DTYPES,
    EPOCH,
    choose_sparse24,
    compress,
    decompress,
    is_24,
    sparse24_matmul,
)

log = logging.getLogger("lmsqueeze")


class SparseLinear(nn.Module):
    """y = x @ W.T + b for a 2:4 weight W stored compressed; x may have any leading dimensions."""

    def __init__(self, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str | None = None):
        super().__init__()
        self.out_features = values.shape[0]
        self.in_features = values.shape[1] * 2
        self.backend = backend
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.register_buffer("bias", bias)
        self._dense: torch.Tensor | None = None
        self._choices: dict[tuple, str] = {}  # (epoch, env mode, rows) -> choose_sparse24's answer
        self._dense_key: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Module, backend: str | None = None) -> SparseLinear:
        """Compress an nn.Linear (or GPT-2's Conv1D) whose weight is 2:4 along its inputs (raises naming
        the first bad group otherwise)."""
        with torch.no_grad():
            values, meta = compress(_weight_out_in(linear).detach().contiguous())
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(values, meta, bias, backend=backend)

    @property
    def weight(self) -> torch.Tensor:
        """The dense-with-zeros weight (materialized on each access; for inspection, not the hot path)."""
        return decompress(self.values, self.meta)

    def _dense_weight(self) -> torch.Tensor:
        key = (self.values.data_ptr(), self.values._version, self.values.device, self.values.dtype)
        if self._dense is None or self._dense_key != key:
            self._dense, self._dense_key = decompress(self.values, self.meta), key
        return self._dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        if self.backend is None and self._choice(rows) == "dense":
            return F.linear(x, self._dense_weight(), self.bias)
        if self._cpu_direct(x):
            # the dispatcher's checks cost ~10 us a call, a third of a 576x576 2:4 GEMV: skip them
            # when the C++ kernel will run anyway (it checks its own shapes and dtypes)
            y = _ext.ext().sparse24_matmul_cpu(x.reshape(rows, self.in_features), self.values, self.meta, self.bias)
            return y.reshape(*x.shape[:-1], self.out_features)
        return sparse24_matmul(x, self.values, self.meta, self.bias, backend=self.backend)

    def _choice(self, rows: int) -> str:
        key = (EPOCH[0], os.environ.get("LMSQUEEZE_SPARSE24"), rows)
        choice = self._choices.get(key)
        if choice is None:
            if len(self._choices) > 64:
                self._choices.clear()
            choice = self._choices[key] = choose_sparse24(self.out_features, self.in_features, rows,
                                                          self.values.dtype, self.values.device)
        return choice

    def _cpu_direct(self, x: torch.Tensor) -> bool:
        return (self.backend is None and x.device.type == "cpu" and x.dim() >= 1 and x.shape[-1] == self.in_features
                and x.dtype == self.values.dtype and x.dtype in _CPU_DTYPES and _ext.has_op("sparse24_matmul_cpu")
                and not os.environ.get("LMSQUEEZE_BACKEND"))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format=2:4 ({self.values.dtype}, meta int16)")


def sparsify_model(model: nn.Module, backend: str | None = None) -> list[str]:
    """Swap, in place, every linear module whose weight is exactly 2:4 for a SparseLinear; returns their names.

    Linear modules are nn.Linear ([out, in] weight) and GPT-2's Conv1D (y = x @ W + b with W stored
    [in, out], i.e. the transpose: its groups of 4 run along W's first dimension), the same two kinds the
    compressor prunes. Layers that are not 2:4 (or whose width is not a multiple of 16) stay dense. A
    weight tied to another module (e.g. lm_head tied to the embedding) is left alone: the embedding
    still needs it.
    """
    shared = _tied_weight_ids(model)
    swapped = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not _is_linear(child) or id(child.weight) in shared:
                continue
            if not is_24(_weight_out_in(child).detach()):
                continue
            setattr(parent, name, SparseLinear.from_linear(child, backend=backend))
            swapped.append(f"{parent_name}.{name}" if parent_name else name)
    log.info("sparsify_model: %d linear layer(s) now 2:4 compressed", len(swapped))
    return swapped


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers without Conv1D: only nn.Linear exists
        return None
    return Conv1D


def _is_linear(mod: nn.Module) -> bool:
    """Exactly nn.Linear or Conv1D (subclasses such as quantized linears carry other weights)."""
    return type(mod) is nn.Linear or (_conv1d_type() is not None and type(mod) is _conv1d_type())


def _weight_out_in(mod: nn.Module) -> torch.Tensor:
    """The weight as [out, in] (a view): Conv1D stores [in, out]."""
    return mod.weight if type(mod) is nn.Linear else mod.weight.t()


def _tied_weight_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def load_sparse(name_or_path: str, dtype: str | torch.dtype | None = "bf16", device: str | torch.device = "cpu",
                backend: str | None = None):
    """(model, tokenizer, swapped names): load a saved 2:4 checkpoint and run its 2:4 layers as SparseLinear.

    Either a plain HF directory with exact zeros (the dense-with-zeros format): loaded dense, then its 2:4
    layers are compressed; or a packed directory (`--format sparse24`, and the quantized gptq /
    compressed-tensors ones lmsqueeze writes): lmsqueeze.compressor.packed.load_packed makes its packed
    modules SparseLinear / Sparse24QuantLinear / QuantLinear directly, with no dense copy ever in memory.
    """
    from lmsqueeze.models import is_packed, load_model, parse_dtype

    if is_packed(name_or_path):
        from lmsqueeze.compressor.packed import load_packed

        model, tokenizer, swapped = load_packed(name_or_path, device=device, backend=backend)
        torch_dtype = None if dtype is None else parse_dtype(dtype)
        if torch_dtype is not None and torch_dtype != model.get_input_embeddings().weight.dtype:
            model = model.to(torch_dtype)
        return model, tokenizer, swapped
    model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
    swapped = sparsify_model(model, backend=backend)
    if not swapped:
        raise LmsqueezeError(f"'{name_or_path}' has no 2:4 linear layer (nn.Linear or Conv1D whose every group of 4 "
                             f"weights along the input holds at most 2 non-zeros); prune it to 2:4 first")
    return model, tokenizer, swapped
