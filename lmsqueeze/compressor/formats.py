"""Checkpoint formats: which one a run writes and what each one stores.

    dense               the model as it is in memory: fake-quantized floats, exact zeros; any tool loads it
    compressed-tensors  pack-quantized (what llm-compressor writes; vLLM and transformers load it): per linear
                        module weight_packed int32 (32 codes in `bits` words, dense bit packing), weight_scale
                        [out, groups] in the model dtype, weight_zero_point packed along the output dim
                        (asymmetric grids only), weight_shape; quantization_config in config.json
    gptq                the GPTQ layout (GPTQModel, transformers' GPTQ loader): qweight int32 [in * bits / 32,
                        out] (32 / bits codes per word, along the input dim, lowest bits first), qzeros int32
                        [groups, out * bits / 32] (zero - 1 in the v1 format), scales fp16 [groups, out],
                        g_idx int32 [in] (the group of each input column; act-order permutes it)
    sparse24            the project's packed 2:4 (lmsqueeze.kernels.sparse24: values [out, in/2] + meta int16
                        [out, in/16]) for every 2:4 linear module, other tensors dense, and a manifest
                        (sparse24.json); joint 2:4 + 4-bit stores the 4-bit codes of the kept values with the
                        metadata (lmsqueeze.kernels.quant.Sparse24QuantWeight)

lmsqueeze.compressor.packed.load_packed reads the three packed formats back with the compressed modules
kept packed (no dense copy).

The packed quantized formats store the integer codes, zero points and g_idx the solver chose (the
QuantGrid the driver keeps with compress(..., grids=...)), never codes re-derived from rounded floats;
scales are stored in the format's scale dtype (the model dtype for compressed-tensors, fp16 for gptq).

`plan(model, config, fmt)` runs before any compression work: it refuses what a format cannot hold
(a group size that does not divide a width, act-order groups in compressed-tensors, 3-bit gptq, ...)
with one message naming the value and what would be valid, so no file is written that a loader rejects.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")

FORMATS = ("dense", "compressed-tensors", "gptq", "sparse24")
QUANTIZED_FORMATS = ("compressed-tensors", "gptq")
SPARSE24_MANIFEST = "sparse24.json"
SPARSE24_FORMAT = "lmsqueeze-sparse24/1"
GPTQ_BITS = (2, 4, 8)  # 32 / bits codes per int32 word; 3-bit GPTQ packs across words, which we do not write


def is_quantizer(config) -> bool:
    return getattr(config, "bits", None) is not None


def default_format(config) -> str:
    """Symmetric quantizers: compressed-tensors (packed); everything else: dense-with-zeros.

    Asymmetric pack-quantized checkpoints do not load through plain `from_pretrained` with transformers 5.24
    and compressed-tensors 0.20 (its loader expects the zero points unpacked, [out, groups], while its
    compressor writes them packed): they need `quantization_config=CompressedTensorsConfig(dequantize=True)`.
    A default must give a file that loads as it is, so asymmetric grids default to dense; `--format
    compressed-tensors` still writes them, with a note that says how to load them.
    """
    return "compressed-tensors" if is_quantizer(config) and getattr(config, "sym", False) else "dense"


def sparsity_structure(config) -> str | None:
    """"2:4" / "N:M" / "unstructured" for pruning configs, None when nothing is pruned."""
    if not hasattr(config, "sparsity"):
        return None
    nm = config.nm
    return f"{nm[0]}:{nm[1]}" if nm else "unstructured"


@dataclass
class Plan:
    """What a format will write for a model and config; notes are said before compressing."""

    format: str
    modules: dict[str, tuple[int, int]] = field(default_factory=dict)  # compressed module -> (out, in)
    notes: list[str] = field(default_factory=list)


def _targets(model, config) -> dict[str, nn.Module]:
    from lmsqueeze.compressor.driver import find_decoder_layers, linear_modules

    layers = find_decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    out = {}
    for i, layer in enumerate(layers):
        out.update(linear_modules(layer, f"{prefix}.{i}", config))
    return out


def _shape(mod) -> tuple[int, int]:
    from lmsqueeze.compressor.driver import weight_of

    out, inp = weight_of(mod).shape
    return int(out), int(inp)


def _dividing_group_sizes(widths: set[int]) -> list[int]:
    g = math.gcd(*widths) if widths else 0
    return [d for d in (256, 128, 64, 32, 16, 8) if g % d == 0][:4]


def plan(model, config, fmt: str | None, *, offload: bool = False, quantize_embedding: bool = False) -> Plan:
    """Check that `fmt` can hold `config` applied to `model` (before any work); raises LmsqueezeError if not.

    quantize_embedding: the input embedding is put on the linear layers' grid too
    (lmsqueeze.compressor.embeddings); only compressed-tensors stores it packed, dense keeps the
    fake-quantized table at full size."""
    fmt = default_format(config) if fmt is None else fmt
    if fmt not in FORMATS:
        raise LmsqueezeError(f"format '{fmt}' is unknown; valid: {', '.join(FORMATS)}")
    if quantize_embedding and not is_quantizer(config):
        raise LmsqueezeError(f"--quantize-embedding puts the embedding on the quantizer's grid, but {config.method} "
                             f"without --bits quantizes nothing; add --bits or leave out --quantize-embedding")
    if quantize_embedding and fmt in ("gptq", "sparse24"):
        raise LmsqueezeError(f"--format {fmt} has no place for a quantized embedding; use --format compressed-tensors "
                             f"(stores it packed) or dense, or leave out --quantize-embedding")
    targets = _targets(model, config)
    p = Plan(fmt, {n: _shape(m) for n, m in targets.items()})
    quant = is_quantizer(config)
    gs = getattr(config, "group_size", -1) if quant else -1
    widths = {inp for _, inp in p.modules.values()}
    ragged = sorted({w for w in widths if gs != -1 and w % gs})
    if fmt == "dense":
        if quantize_embedding:
            p.notes.append("the quantized embedding is written fake-quantized at full size in dense; "
                           "--format compressed-tensors stores it packed")
        if ragged:
            p.notes.append(f"group size {gs} does not divide input width(s) {', '.join(map(str, ragged))}: the last "
                           f"group of each row there holds {', '.join(str(w % gs) for w in ragged)} column(s)")
        return p
    if offload and fmt != "dense":
        raise LmsqueezeError(f"--format {fmt} is not written from --offload disk (the layers live in files there); "
                             f"use --offload cpu or none, or --format dense")
    from lmsqueeze.compressor.driver import is_conv1d

    conv = [n for n, m in targets.items() if is_conv1d(m)]
    if fmt == "compressed-tensors" and quantize_embedding:
        p.notes.append("a quantized embedding loads in transformers with quantization_config=CompressedTensorsConfig("
                       "dequantize=True) (the compressed-module route finds no output head to tie it to), and in "
                       "lmsqueeze (eval, load_packed) as it is")
    if fmt == "compressed-tensors" and quant and not getattr(config, "sym", False):
        p.notes.append("asymmetric pack-quantized checkpoints load in transformers with quantization_config="
                       "CompressedTensorsConfig(dequantize=True) (plain from_pretrained rejects their packed zero "
                       "points); --sym writes one that loads as it is")
    if fmt in QUANTIZED_FORMATS:
        if not quant:
            from lmsqueeze.compressor.methods import get

            if get(config.method).kind == "quantize":  # nf4, llm-int8: their grids are not integer codes on a group grid
                raise LmsqueezeError(f"--format {fmt} stores integer codes on a group grid; {config.method} keeps "
                                     f"another layout (see its module docstring) and is written as --format dense")
            raise LmsqueezeError(f"--format {fmt} stores quantized weights but {config.method} "
                                 f"{getattr(config, 'sparsity', '')} quantizes nothing; valid for it: dense"
                                 + (", sparse24" if sparsity_structure(config) == "2:4" else ""))
        if conv:
            raise LmsqueezeError(f"--format {fmt} packs nn.Linear weights; {conv[0]} is a GPT-2 Conv1D "
                                 f"({len(conv)} such module(s)); use --format dense")
        if ragged:
            valid = _dividing_group_sizes(widths)
            raise LmsqueezeError(
                f"group size {gs} does not divide the input width(s) {', '.join(map(str, ragged))} of this model "
                f"(e.g. {next(n for n, s in p.modules.items() if s[1] in ragged)}); {fmt} needs whole groups "
                f"(its loaders reject a partial last group). Valid: --group-size "
                f"{' or '.join(map(str, valid + [-1]))}, or --format dense (keeps the partial last group)")
    if fmt == "compressed-tensors":
        if getattr(config, "act_order", False) and gs != -1:
            raise LmsqueezeError("act-order with groups needs a g_idx per column, which compressed-tensors no longer "
                                 "stores; use --format gptq (carries g_idx), --group-size -1, or drop --act-order")
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            raise LmsqueezeError("--format compressed-tensors needs the compressed-tensors package: "
                                 "pip install 'lmsqueeze[deploy]' (or pip install compressed-tensors)") from None
    if fmt == "gptq":
        if config.bits not in GPTQ_BITS:
            raise LmsqueezeError(f"--format gptq writes {', '.join(map(str, GPTQ_BITS))}-bit weights (32 / bits codes "
                                 f"per int32 word), not {config.bits}-bit; use --format compressed-tensors for "
                                 f"{config.bits}-bit")
        per_word = 32 // config.bits
        bad = [(n, s) for n, s in p.modules.items() if s[0] % per_word or s[1] % per_word]
        if bad:
            raise LmsqueezeError(f"--format gptq packs {per_word} codes per word along both dimensions; {bad[0][0]} is "
                                 f"{bad[0][1][0]} x {bad[0][1][1]}; use --format compressed-tensors or dense")
        if config.method == "sparsegpt":
            p.notes.append("gptq format: the pruned weights are stored as codes equal to the zero point")
    if fmt == "sparse24":
        if sparsity_structure(config) != "2:4":
            raise LmsqueezeError(f"--format sparse24 stores 2:4 weights; {config.method} with sparsity "
                                 f"{getattr(config, 'sparsity', None)} is not 2:4; use --sparsity 2:4 or --format dense")
        if quant:
            from lmsqueeze.kernels.quant import SPARSE24_BITS

            if config.bits not in SPARSE24_BITS:
                raise LmsqueezeError(f"--format sparse24 stores joint 2:4 + {', '.join(map(str, SPARSE24_BITS))}-bit "
                                     f"codes, not {config.bits}-bit; use --bits 4, --format compressed-tensors or dense")
            if gs != -1 and gs % 16:
                raise LmsqueezeError(f"--format sparse24 with --bits needs groups of whole metadata words: a "
                                     f"--group-size that is a multiple of 16 (or -1), not {gs}")
            if getattr(config, "act_order", False):
                raise LmsqueezeError("--format sparse24 groups consecutive columns; act-order groups need "
                                     "--format gptq or dense")
        bad = [(n, s) for n, s in p.modules.items() if s[1] % 16]
        if bad:
            raise LmsqueezeError(f"--format sparse24 needs input widths that are multiples of 16; {bad[0][0]} has "
                                 f"{bad[0][1][1]}; use --format dense")
        if conv:
            raise LmsqueezeError(f"--format sparse24 packs nn.Linear weights; {conv[0]} is a GPT-2 Conv1D; "
                                 f"use --format dense")
    return p


# ---- packing ---------------------------------------------------------------------------------------------

def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> int32 with the same bits (two's complement)."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def gptq_pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, m] codes in [0, 2^bits) -> int32 [n * bits / 32, m]: word i of column j holds rows
    i * 32/bits .. (i+1) * 32/bits - 1 of column j, the first in the lowest bits."""
    per = 32 // bits
    n, m = codes.shape
    c = codes.to(torch.int64).reshape(n // per, per, m)
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    return _to_int32((c << shifts).sum(dim=1))


def gptq_unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of gptq_pack_rows: int32 [k, m] -> int64 codes [k * 32 / bits, m]."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    return ((w.unsqueeze(1) >> shifts) & (2 ** bits - 1)).reshape(-1, words.shape[1])


# ---- state dicts per format ------------------------------------------------------------------------------

def _need_grids(names, grids):
    missing = [n for n in names if n not in (grids or {})]
    if missing:
        raise LmsqueezeError(f"no quantization grid was kept for {missing[0]} ({len(missing)} module(s)): compress "
                             f"with grids={{}} (compress(..., grids=...)) to write a packed quantized format")


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def embedding_grids(model, grids: dict | None, names) -> list[str]:
    """Names of nn.Embedding modules with a grid (lmsqueeze.compressor.embeddings) besides the linear `names`."""
    mods = dict(model.named_modules())
    return [n for n in (grids or {}) if n not in names and isinstance(mods.get(n), nn.Embedding)]


def _tied_keys(model, module_name: str) -> set[str]:
    """State-dict keys whose tensor is module_name's weight (a tied output head shares the embedding's)."""
    weight = dict(model.named_modules())[module_name].weight
    return {k for k, v in model.state_dict(keep_vars=True).items() if v is weight}


def compressed_tensors_state(model, grids: dict, names: list[str]) -> tuple[dict, dict]:
    """(tensors to write, config.json's quantization_config) for pack-quantized, via the compressed-tensors library.

    The linear modules `names` form config group "group_0" (targets Linear); a quantized input embedding
    (lmsqueeze.compressor.embeddings) forms "group_1" (targets Embedding), stored the same way."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    _need_grids(names, grids)
    dtype = next(model.parameters()).dtype
    sd = {}
    embeddings = embedding_grids(model, grids, names)
    for name in [*names, *embeddings]:
        g = grids[name]
        offset = 2 ** (g.bits - 1)  # compressed-tensors stores signed codes: q - 2^(bits-1)
        sd[f"{name}.weight_packed"] = pack_to_int32((g.codes.to(torch.int16) - offset).to(torch.int8), g.bits)
        sd[f"{name}.weight_scale"] = g.scale.to(dtype).contiguous()
        sd[f"{name}.weight_shape"] = torch.tensor(list(g.codes.shape), dtype=torch.int64)
        if not g.sym:
            zp = (g.zero.to(torch.int16) - offset).to(torch.int8)
            sd[f"{name}.weight_zero_point"] = pack_to_int32(zp, g.bits, packed_dim=0)

    def args(g):
        return QuantizationArgs(num_bits=g.bits, type="int", symmetric=g.sym,
                                strategy="channel" if g.group_size == -1 else "group",
                                group_size=None if g.group_size == -1 else g.group_size, observer="minmax")

    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args(grids[names[0]]))}
    if embeddings:
        groups["group_1"] = QuantizationScheme(targets=["Embedding"], weights=args(grids[embeddings[0]]))
    ignore = [n for n in _linear_names(model) if n not in grids]
    qconfig = QuantizationConfig(config_groups=groups, format="pack-quantized",
                                 quantization_status="compressed", ignore=ignore)
    return sd, ModelCompressor(quantization_config=qconfig)


def gptq_state(model, grids: dict, names: list[str], config) -> tuple[dict, dict, list[str]]:
    """(tensors, quantization_config, notes) in the GPTQ layout; v1 zeros (zero - 1) unless a zero point is 0."""
    _need_grids(names, grids)
    g0 = grids[names[0]]
    v1 = g0.sym or all(bool((grids[n].zero >= 1).all()) for n in names)
    sd = {}
    for name in names:
        g = grids[name]
        sd[f"{name}.qweight"] = gptq_pack_rows(g.codes.t().contiguous(), g.bits)        # [in*bits/32, out]
        zeros = g.zero.t().to(torch.int64) - (1 if v1 else 0)                            # [groups, out]
        sd[f"{name}.qzeros"] = gptq_pack_rows(zeros.t().contiguous(), g.bits).t().contiguous()
        sd[f"{name}.scales"] = g.scale.t().to(torch.float16).contiguous()
        sd[f"{name}.g_idx"] = g.g_idx.to(torch.int32).contiguous()
    qc = {"quant_method": "gptq", "bits": g0.bits, "group_size": g0.group_size,
          "desc_act": bool(g0.act_order), "sym": bool(g0.sym), "static_groups": False, "true_sequential": True,
          "damp_percent": getattr(config, "percdamp", None), "checkpoint_format": "gptq" if v1 else "gptq_v2",
          "meta": {"quantizer": ["lmsqueeze"]}}
    notes = [] if v1 else ["a zero point of 0 occurs, which the v1 GPTQ layout (zero - 1) cannot hold: written as "
                           "checkpoint_format gptq_v2 (exact zeros)"]
    return sd, qc, notes


def sparse24_state(model, names: list[str], grids: dict | None = None) -> tuple[dict, dict]:
    """(tensors for the 2:4 modules; manifest): values + meta, or, for modules with a quantization grid
    (joint 2:4 + 4-bit), the 4-bit codes of the kept values + meta + fp32 group scales + uint8 zeros
    (lmsqueeze.kernels.quant.Sparse24QuantWeight: the solver's codes and grid, nothing re-rounded)."""
    from lmsqueeze.kernels.quant import sparse24_quant_pack_codes
    from lmsqueeze.kernels.sparse24 import compress

    mods = dict(model.named_modules())
    sd, manifest = {}, {}
    for name in names:
        mod = mods[name]
        info = {"out_features": int(mod.weight.shape[0]), "in_features": int(mod.weight.shape[1]),
                "bias": mod.bias is not None}
        if grids:
            _need_grids([name], grids)
            g = grids[name]
            p = sparse24_quant_pack_codes(g.codes, g.scale, g.zero, g.bits, g.group_size)
            sd.update({f"{name}.{k}": v.contiguous() for k, v in p.tensors().items()})
            info.update(bits=p.bits, group_size=p.group_size, sym=p.sym)
        else:
            values, meta = compress(mod.weight.detach())
            sd[f"{name}.values"], sd[f"{name}.meta"] = values.contiguous(), meta.contiguous()
        manifest[name] = info
    return sd, {"format": SPARSE24_FORMAT, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "layout": "values [out, in/2] (the 2 kept entries of every 4 inputs, column order) + meta int16 "
                          "[out, in/16] (2-bit positions, 4 groups per word, group k of a word in bits 4k..4k+3); "
                          "see lmsqueeze.kernels.sparse24; modules with bits: qvalues int32 [out, in/16] (4-bit "
                          "codes of the kept values) + meta + scales fp32 / zeros uint8 [out, groups], see "
                          "lmsqueeze.kernels.quant.Sparse24QuantWeight",
                "modules": manifest}


@dataclass
class Packed:
    """What a format writes besides the model's own tensors."""

    tensors: dict                                   # full name -> tensor, written in place of ...
    replaces: set                                   # ... these state-dict keys (the packed modules' weights)
    config: dict = field(default_factory=dict)      # merged into config.json
    files: dict = field(default_factory=dict)       # extra JSON files: name -> object
    finish: object = None                           # callable(directory) run after config.json is written
    notes: list = field(default_factory=list)


def pack(model, plan_: Plan, config, grids: dict | None) -> Packed:
    """The tensors and config of plan_.format for `model` (its modules compressed with `config`)."""
    names = list(plan_.modules)
    weights = {f"{n}.weight" for n in names}
    if plan_.format == "compressed-tensors":
        sd, compressor = compressed_tensors_state(model, grids, names)
        for name in embedding_grids(model, grids, names):  # the embedding and an output head tied to it
            weights |= _tied_keys(model, name)
        return Packed(sd, weights, finish=compressor.update_config)  # the library writes quantization_config
    if plan_.format == "gptq":
        sd, qc, notes = gptq_state(model, grids, names, config)
        return Packed(sd, weights, config={"quantization_config": qc}, notes=notes)
    if plan_.format == "sparse24":
        sd, manifest = sparse24_state(model, names, grids if is_quantizer(config) else None)
        # a bias stays under {name}.bias, which is SparseLinear's bias buffer too
        return Packed(sd, weights, files={SPARSE24_MANIFEST: manifest})
    return Packed({}, set())


# ---- reading the files back (lmsqueeze.compressor.packed.load_packed) ---------------------------------

def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        with open(index, encoding="utf-8") as f:
            return [directory / s for s in sorted(set(json.load(f)["weight_map"].values()))]
    single = directory / "model.safetensors"
    if not single.exists():
        raise LmsqueezeError(f"'{directory}' holds no model.safetensors (nor an index of shards)")
    return [single]
