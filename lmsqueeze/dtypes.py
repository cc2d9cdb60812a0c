"""The one default dtype of eval, compress and study (no torch import: the CLI resolves it before loading)."""
from __future__ import annotations


def resolve_dtype(dtype: str | None, device: str | None) -> str:
    """"auto" (or None) -> "bf16" when the work runs on CUDA, else "fp32" (bf16 GEMMs are slow on CPUs without
    AVX-512-BF16 or AMX); any other value unchanged (checked where it is parsed)."""
    if dtype not in (None, "auto"):
        return dtype
    return "bf16" if str(device or "cpu").startswith("cuda") else "fp32"
