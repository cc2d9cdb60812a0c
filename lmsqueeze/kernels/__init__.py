"""Kernels: each op has a plain-PyTorch `_ref`, fast paths (C++, CUDA, Triton) and one dispatcher."""
from lmsqueeze.kernels.col_sq_norm import col_sq_norm_update, col_sq_norm_update_ref
from lmsqueeze.kernels.hessian import hessian_finalize, hessian_update, hessian_update_ref
from lmsqueeze.kernels.masks import check_nm, nm_mask, nm_mask_ref, rowwise_mask, rowwise_mask_ref, wanda_scores

__all__ = [
    "check_nm", "col_sq_norm_update", "col_sq_norm_update_ref", "hessian_finalize", "hessian_update",
    "hessian_update_ref", "nm_mask", "nm_mask_ref", "rowwise_mask", "rowwise_mask_ref", "wanda_scores",
]
from lmsqueeze.kernels.obs import PruneSpec, QuantSpec, find_params, obs_update, obs_update_ref, quantize, quantize_rtn  # noqa: E402

__all__ += ["PruneSpec", "QuantSpec", "find_params", "obs_update", "obs_update_ref", "quantize", "quantize_rtn"]
