"""Kernels: each op has a plain-PyTorch `_ref`, fast paths (C++, CUDA, Triton) and one dispatcher."""
from lmsqueeze.kernels.col_sq_norm import col_sq_norm_update, col_sq_norm_update_ref

__all__ = ["col_sq_norm_update", "col_sq_norm_update_ref"]
