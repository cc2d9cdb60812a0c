"""One loader for every packed checkpoint lmsqueeze writes: the compressed modules stay packed in memory.

    model, tokenizer, swapped = load_packed("out/smollm2-gptq4")   # any of the three formats below

    sparse24            values + meta (SparseLinear) or, for joint 2:4 + 4-bit, 4-bit codes of the kept
                        values + meta + group scales/zeros (Sparse24QuantLinear); manifest sparse24.json
    gptq                qweight / qzeros / scales / g_idx (quantization_config.quant_method "gptq")
    compressed-tensors  pack-quantized weight_packed / weight_scale / weight_zero_point
                        (quantization_config.quant_method "compressed-tensors")

The model is built on the meta device, each packed module becomes a QuantLinear (4- and 8-bit codes;
lmsqueeze.qlinear), Sparse24QuantLinear or SparseLinear holding the stored codes and grid as they are
(nothing is re-rounded: the scales are read in the dtype they were written in and widened to fp32,
so a module's weight is scale * (code - zero) exactly as the format defines it), and every other tensor
is assigned from the files. Codes the packed kernels do not run (2- and 3-bit) and quantized
embeddings are dequantized into ordinary weights once at load, and the returned report says so.

The layouts (formats.py and lmsqueeze.kernels.quant document them) are read here with lmsqueeze's own
unpacking; the tests check them against the owning libraries (compressed-tensors' pack_to_int32, an
independent GPTQ reader).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")

PACKED_FORMATS = ("sparse24", "gptq", "compressed-tensors")


# ---- bit streams ------------------------------------------------------------------------------------------

def unpack_bitstream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 words [rows, nw] holding `count` codes of `bits` bits per row as one little-endian bit stream
    (code e occupies stream bits e*bits .. e*bits+bits-1, stream bit p is bit p % 32 of word p // 32; codes
    may straddle words, as compressed-tensors packs 3-bit) -> int64 codes [rows, count]."""
    if words.dim() != 2 or words.dtype != torch.int32:
        raise LmsqueezeError(f"packed words must be int32 [rows, words], got {tuple(words.shape)} {words.dtype}")
    rows, nw = words.shape
    if nw * 32 < count * bits:
        raise LmsqueezeError(f"{nw} int32 word(s) per row hold {nw * 32 // bits} {bits}-bit codes, not {count}")
    if 32 % bits == 0:  # no code straddles a word: whole codes per word (lmsqueeze.kernels.quant's layout)
        from lmsqueeze.kernels.quant import unpack_codes

        return unpack_codes(words, bits, count)
    w = words.to(torch.int64) & 0xFFFFFFFF
    stream = ((w.unsqueeze(-1) >> torch.arange(32, device=words.device)) & 1).reshape(rows, nw * 32)
    fields = stream[:, :count * bits].reshape(rows, count, bits)
    return (fields << torch.arange(bits, device=words.device)).sum(-1)


# ---- what a directory holds ------------------------------------------------------------------------------

def packed_format(directory: str | os.PathLike) -> str | None:
    """The packed format of a checkpoint directory lmsqueeze wrote (its lmsqueeze.json says save_format), or
    of any directory holding a sparse24 manifest; None for dense checkpoints and everything else."""
    from lmsqueeze.compressor.formats import SPARSE24_MANIFEST

    d = Path(directory)
    if not d.is_dir():
        return None
    if (d / SPARSE24_MANIFEST).exists():
        return "sparse24"
    meta = d / "lmsqueeze.json"
    if not meta.exists():
        return None
    try:
        fmt = json.loads(meta.read_text(encoding="utf-8")).get("save_format")
    except (OSError, ValueError):
        return None
    return fmt if fmt in PACKED_FORMATS else None


def _state(directory: Path, device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from lmsqueeze.compressor.formats import _safetensors_files

    state = {}
    for file in _safetensors_files(directory):
        state.update(load_file(file, device=str(device)))
    return state


def _pop(state: dict, directory: Path, name: str, *suffixes: str) -> list[torch.Tensor]:
    try:
        return [state.pop(f"{name}.{s}") for s in suffixes]
    except KeyError as exc:
        raise LmsqueezeError(f"{directory}: {name} is listed as packed but the files hold no {exc.args[0]}") from None


# ---- per format: name -> packed weight (QuantWeight / Sparse24QuantWeight / (values, meta) / dense tensor) --

def _sparse24_modules(directory: Path, state: dict) -> dict:
    from lmsqueeze.compressor.formats import SPARSE24_FORMAT, SPARSE24_MANIFEST
    from lmsqueeze.kernels.quant import Sparse24QuantWeight, check_sparse24_packed

    with open(directory / SPARSE24_MANIFEST, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("format") != SPARSE24_FORMAT:
        raise LmsqueezeError(f"{directory / SPARSE24_MANIFEST} has format {manifest.get('format')!r}; this "
                             f"lmsqueeze reads {SPARSE24_FORMAT}")
    out = {}
    for name, info in manifest["modules"].items():
        shape = (int(info["out_features"]), int(info["in_features"]))
        if info.get("bits"):
            qvalues, meta, scales, zeros = _pop(state, directory, name, "qvalues", "meta", "scales", "zeros")
            p = Sparse24QuantWeight(qvalues, meta, scales.float(), zeros, shape, int(info["bits"]),
                                    int(info["group_size"]), bool(info.get("sym", False)))
            check_sparse24_packed(p)
            out[name] = p
        else:
            out[name] = tuple(_pop(state, directory, name, "values", "meta"))
    return out


def _quant_weight(codes, scales, zeros, bits, group_size, g_idx=None):
    """QuantWeight for 4/8-bit codes; the dequantized fp32 weight for the widths the kernels do not run."""
    from lmsqueeze.kernels.quant import QUANT_BITS, quant_pack_codes

    if bits in QUANT_BITS:
        return quant_pack_codes(codes, scales, zeros, bits, group_size, g_idx)
    cols = codes.shape[1]
    g = (torch.arange(cols, device=codes.device) // (cols if group_size == -1 else group_size)
         if g_idx is None else g_idx.long())
    return scales.float()[:, g] * (codes.float() - zeros.float()[:, g])


def _gptq_modules(directory: Path, state: dict, qc: dict) -> dict:
    from lmsqueeze.compressor.formats import gptq_unpack_rows

    bits, gs = int(qc["bits"]), int(qc["group_size"])
    v1 = qc.get("checkpoint_format", "gptq") == "gptq"
    out = {}
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        qweight, qzeros, scales, g_idx = _pop(state, directory, name, "qweight", "qzeros", "scales", "g_idx")
        codes = gptq_unpack_rows(qweight, bits).t()                        # [out, in]
        zeros = gptq_unpack_rows(qzeros.t().contiguous(), bits) + (1 if v1 else 0)  # [out, groups]
        out[name] = _quant_weight(codes, scales.t().float(), zeros, bits, gs, g_idx)
    return out


def _compressed_tensors_modules(directory: Path, state: dict, qc: dict, mods: dict) -> dict:
    from lmsqueeze.kernels.quant import QUANT_BITS, QuantWeight, _check_grid, check_packed

    if qc.get("format") != "pack-quantized":
        raise LmsqueezeError(f"{directory}: compressed-tensors format {qc.get('format')!r} is not one lmsqueeze "
                             f"reads packed (pack-quantized); load it with transformers instead")
    out = {}
    for key in [k for k in state if k.endswith(".weight_packed")]:
        name = key[: -len(".weight_packed")]
        packed, scale, shape = _pop(state, directory, name, "weight_packed", "weight_scale", "weight_shape")
        if name not in mods:
            raise LmsqueezeError(f"{directory}: {name} is not a module of the model its config.json describes")
        args = _ct_args(qc, name, "Embedding" if isinstance(mods[name], nn.Embedding) else "Linear", directory)
        bits = int(args["num_bits"])
        rows, cols = (int(v) for v in shape.tolist())
        offset = 2 ** (bits - 1)
        zp = state.pop(f"{name}.weight_zero_point", None)
        if zp is None:
            zeros = torch.full(scale.shape, offset, dtype=torch.int64)
        else:  # packed along the output dimension
            zeros = unpack_bitstream(zp.t().contiguous(), bits, rows).t()
        gs = -1 if args.get("strategy") == "channel" else int(args["group_size"])
        scales = scale.float().reshape(rows, -1)
        if bits in QUANT_BITS:
            # compressed-tensors shifts its signed codes back by 2^(bits-1) when it packs, so the words hold
            # the unsigned codes, little-endian, whole codes per word: QuantWeight's qweight layout as it is
            p = QuantWeight(packed.contiguous(), *_check_grid(scales, zeros, rows, scales.shape[1], bits), None,
                            None, (rows, cols), bits, cols if gs == -1 else gs, zp is None)
            check_packed(p)
            out[name] = p
        else:
            out[name] = _quant_weight(unpack_bitstream(packed, bits, cols), scales, zeros, bits, gs)
    return out


def _ct_args(qc: dict, name: str, kind: str, directory: Path) -> dict:
    """The weights' QuantizationArgs (as a dict) of the config group whose targets name module `name` or its
    class `kind` ("Linear", "Embedding")."""
    for group in qc.get("config_groups", {}).values():
        targets = group.get("targets", [])
        if name in targets or kind in targets:
            return group["weights"]
    raise LmsqueezeError(f"{directory}: no config group of quantization_config targets {name} ({kind})")


# ---- the loader --------------------------------------------------------------------------------------------

def load_packed(directory: str | os.PathLike, device: str | torch.device = "cpu", backend: str | None = None):
    """(model, tokenizer or None, swapped module names) from a packed checkpoint lmsqueeze wrote.

    directory: written by `lmsqueeze compress --format sparse24 | gptq | compressed-tensors`.
    Compressed linear modules become SparseLinear / QuantLinear / Sparse24QuantLinear holding the stored
    tensors (no dense copy is made); 2- and 3-bit codes (which the packed kernels do not run) and quantized
    embeddings are dequantized into ordinary weights. Tied weights (lm_head = embeddings) are tied again.
    Raises LmsqueezeError for a directory that is not such a checkpoint or whose files do not match its
    manifest or quantization_config.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lmsqueeze.kernels.quant import dequantize
    from lmsqueeze.qlinear import swap_packed
    from lmsqueeze.sparse import SparseLinear

    directory = Path(directory)
    fmt = packed_format(directory)
    if fmt is None:
        raise LmsqueezeError(f"'{directory}' is not a packed lmsqueeze checkpoint (no sparse24.json, and its "
                             f"lmsqueeze.json does not name one of {', '.join(PACKED_FORMATS)}); load it with "
                             f"lmsqueeze.models.load_model")
    cfg = AutoConfig.from_pretrained(directory)
    qc = getattr(cfg, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the skeleton is a plain model; the packed modules are ours
    state = _state(directory, device)
    dtype = next((t.dtype for k, t in state.items() if k.endswith(("norm.weight", "embed_tokens.weight"))
                  and t.is_floating_point()), None) or getattr(cfg, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if fmt == "sparse24":
        modules = _sparse24_modules(directory, state)
    elif fmt == "gptq":
        modules = _gptq_modules(directory, state, qc or {})
    else:
        modules = _compressed_tensors_modules(directory, state, qc or {}, dict(model.named_modules()))
    mods = dict(model.named_modules())
    packed, swapped, dense = {}, [], []
    for name, p in modules.items():
        if name not in mods:
            raise LmsqueezeError(f"{directory}: {name} is not a module of {type(model).__name__}")
        if not isinstance(p, tuple) and not isinstance(mods[name], nn.Linear):  # a quantized embedding
            p = dequantize(p) if not isinstance(p, torch.Tensor) else p
        if isinstance(p, torch.Tensor):  # dequantized at load (2/3-bit codes, embeddings)
            state[f"{name}.weight"] = p.to(dtype)
            dense.append(name)
        elif isinstance(p, tuple):
            if not isinstance(mods[name], nn.Linear):
                raise LmsqueezeError(f"{directory}: {name} is not a linear module of {type(model).__name__}")
            parent, _, child = name.rpartition(".")
            bias = state.pop(f"{name}.bias", None)
            setattr(mods[parent] if parent else model, child, SparseLinear(*p, bias, backend=backend))
            swapped.append(name)
        else:
            packed[name] = p
    swapped += swap_packed(model, packed, backend=backend)
    mods = dict(model.named_modules())
    for name in packed:
        bias = state.pop(f"{name}.bias", None)
        if bias is not None:
            mods[name].bias = bias.to(dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise LmsqueezeError(f"{directory}: tensors that {type(model).__name__} does not have: "
                             f"{', '.join(result.unexpected_keys[:5])}")
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise LmsqueezeError(f"{directory}: no stored tensor for {', '.join(left[:5])}")
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        tokenizer = None
    log.info("load_packed: %s, %d packed module(s)%s from %s", fmt, len(swapped),
             f", {len(dense)} dequantized at load ({dense[0]}, ...)" if dense else "", directory)
    return model, tokenizer, swapped
