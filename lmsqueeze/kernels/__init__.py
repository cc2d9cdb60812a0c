"""Kernels: each op has a plain-PyTorch `_ref`, fast paths (C++, CUDA, Triton) and one dispatcher."""
from lmsqueeze.kernels.col_sq_norm import col_sq_norm_update, col_sq_norm_update_ref
from lmsqueeze.kernels.hessian import hessian_finalize, hessian_update, hessian_update_ref
from lmsqueeze.kernels.masks import (
    check_nm,
    nm_mask,
    nm_mask_ref,
    rowwise_mask,
    rowwise_mask_ref,
    wanda_mask,
    wanda_mask_ref,
    wanda_scores,
)
from lmsqueeze.kernels.sparse24 import compress as sparse24_compress
from lmsqueeze.kernels.sparse24 import decompress as sparse24_decompress
from lmsqueeze.kernels.sparse24 import sparse24_matmul, sparse24_matmul_ref

__all__ = [
    "check_nm", "col_sq_norm_update", "col_sq_norm_update_ref", "hessian_finalize", "hessian_update",
    "hessian_update_ref", "nm_mask", "nm_mask_ref", "rowwise_mask", "rowwise_mask_ref", "wanda_scores",
    "sparse24_compress", "sparse24_decompress", "sparse24_matmul", "sparse24_matmul_ref",
    "wanda_mask", "wanda_mask_ref",
]
from lmsqueeze.kernels.divergence import (  # noqa: E402
    Divergence,
    token_divergence,
    token_divergence_ref,
    token_divergence_topk,
    topk_summary,
)

__all__ += ["Divergence", "token_divergence", "token_divergence_ref", "token_divergence_topk", "topk_summary"]
from lmsqueeze.kernels.obs import (  # noqa: E402
    PruneSpec,
    QuantSpec,
    find_params,
    obs_update,
    obs_update_ref,
    quantize,
    quantize_rtn,
)

__all__ += ["PruneSpec", "QuantSpec", "find_params", "obs_update", "obs_update_ref", "quantize", "quantize_rtn"]
from lmsqueeze.kernels.quant import (  # noqa: E402
    QuantWeight,
    Sparse24QuantWeight,
    dequantize,
    quant_matmul,
    quant_matmul_ref,
    quant_pack,
    quant_pack_codes,
    sparse24_quant_matmul,
    sparse24_quant_matmul_ref,
    sparse24_quant_pack,
    sparse24_quant_pack_codes,
)

__all__ += ["QuantWeight", "Sparse24QuantWeight", "dequantize", "quant_matmul", "quant_matmul_ref", "quant_pack",
            "quant_pack_codes", "sparse24_quant_matmul", "sparse24_quant_matmul_ref", "sparse24_quant_pack",
            "sparse24_quant_pack_codes"]
