"""Quantizing the input embedding (and, through the tie, the output head) with round-to-nearest.

A 4-bit linear-only checkpoint of a small model is dominated by its embedding: SmolLM2-135M's tied
49152 x 576 table is 28.3M of its 134.5M parameters, 56.6 MB of a ~112 MB 4-bit file. Quantizing the
table on the linear layers' grid (bits, group size, symmetry) cuts it 4x at a cost the perplexity
table shows; it is never done unless asked (`lmsqueeze compress --quantize-embedding`), since most
serving stacks keep embeddings in 16 bits.

The grid is lmsqueeze.kernels.obs's RTN grid (the one RTN and GPTQ use); the weights in memory become
the fake-quantized table, so evaluating the model in memory and loading the written checkpoint give
the same numbers. compressed-tensors stores it as a second config group targeting Embedding
(pack-quantized, the library's own layout). The grid is the linear layers' own because
compressed-tensors 0.20.1 decompresses a checkpoint whose config groups differ in bits wrongly (an
8-bit embedding beside 4-bit linear layers came back uncorrelated with the written table, measured;
the same bits round-trip exactly). gptq and sparse24 cannot hold a quantized embedding and are
refused before any work (formats.plan).
"""
from __future__ import annotations

import torch


def embedding_name(model) -> str:
    """The qualified name of the model's input embedding module."""
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb)


def embedding_group_size(width: int, group_size: int | None) -> int:
    """The linear layers' group size when it divides the embedding width, else one scale per row (-1)."""
    return group_size if group_size and group_size > 0 and width % group_size == 0 else -1


def quantize_embeddings(model, bits: int, group_size: int | None = None, sym: bool = True,
                        grids: dict | None = None) -> dict:
    """Round-to-nearest quantize the input embedding in place; returns what was done.

    bits: 2, 3, 4 or 8 (the linear layers' bits). group_size: columns (hidden units) per scale; -1, None,
    or one that does not divide the width: one scale per vocabulary row. sym: symmetric grid or min/max.
    The table's weights become scale * (code - zero) in the model dtype (a tied output head follows,
    being the same tensor). grids: if given, the QuantGrid is stored under the embedding's module name,
    for the packed formats. Returns {"module", "bits", "group_size", "sym", "tied", "rows", "width"}.
    Raises LmsqueezeError (from QuantSpec) for unsupported bits.
    """
    from lmsqueeze.kernels.obs import QuantSpec, quantize_rtn_grid

    emb = model.get_input_embeddings()
    weight = emb.weight
    rows, width = weight.shape
    gs = embedding_group_size(width, group_size)
    spec = QuantSpec(bits, gs, sym)
    with torch.no_grad():
        wq, grid = quantize_rtn_grid(weight.detach(), spec)
        weight.copy_(wq.to(weight.dtype))
    name = embedding_name(model)
    if grids is not None:
        grids[name] = grid
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is weight
    return {"module": name, "bits": bits, "group_size": gs, "sym": sym, "tied": tied, "rows": int(rows),
            "width": int(width)}
