"""Save and load compressed models as plain Hugging Face checkpoints plus `lmsqueeze.json`.

The format (lmsqueeze.compressor.formats) is dense with exact zeros (and dequantized values for quantized
methods), which any tool that reads Hugging Face checkpoints loads, or packed: compressed-tensors
pack-quantized, GPTQ, or the project's 2:4 values + metadata. `lmsqueeze.json` records what was done:
method and config, calibration source and size, per-module sparsity and reconstruction error, time per
phase, peak memory, versions, bytes on disk and bits per weight; README.md is a model card saying how to
load it. The directory is written beside the target under a temporary name and renamed into place, so
an interrupted save leaves no half-written checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")

METADATA = "lmsqueeze.json"
SCHEMA = "lmsqueeze.compressed/1"


def _versions() -> dict:
    import importlib.metadata as md

    import torch

    from lmsqueeze import __version__

    def v(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {"lmsqueeze": __version__, "torch": torch.__version__, "transformers": v("transformers"),
            "python": platform.python_version()}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _open_up(tmp: Path) -> None:
    """Modes a file or directory created with open()/mkdir() gets under the umask: 0666 / 0777 & ~umask.

    mkdtemp makes the directory 0700, and safetensors creates its files 0600 whatever the umask (a
    plain save_pretrained's model.safetensors is 0600 too): a colleague or a server running as another
    user could not read the checkpoint. The umask still decides, as for any file the user writes.
    """
    mask = _umask()
    for path in [tmp, *tmp.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _dir_bytes(directory: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and f.name not in skip)


def _unique_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():  # tied parameters once, as the checkpoint stores them
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _sizes(tmp: Path, model, plan, packed) -> dict:
    """Bytes on disk and bits per weight: for the compressed modules and for the whole checkpoint."""
    weights_bytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    params = _unique_params(model)
    mod_weights = sum(o * i for o, i in plan.modules.values())
    if packed.tensors:
        mod_bytes = sum(t.numel() * t.element_size() for t in packed.tensors.values())
        mods = dict(model.named_modules())
        # a quantized embedding (--quantize-embedding) is packed beside the linear modules: count its weights too
        mod_weights += sum(mods[k.removesuffix(".weight_packed")].weight.numel() for k in packed.tensors
                           if k.endswith(".weight_packed") and k.removesuffix(".weight_packed") not in plan.modules)
    else:
        mods = dict(model.named_modules())
        mod_bytes = sum(mods[n].weight.numel() * mods[n].weight.element_size() for n in plan.modules)
    return {"format": plan.format, "weights_bytes": weights_bytes,
            "checkpoint_bytes": _dir_bytes(tmp, skip=(METADATA,)),
            "bf16_bytes": 2 * params, "fraction_of_bf16": weights_bytes / (2 * params) if params else None,
            "params": params, "bits_per_param": 8 * weights_bytes / params if params else None,
            "compressed_modules": len(plan.modules), "compressed_weights": mod_weights,
            "compressed_modules_bytes": mod_bytes,
            "bits_per_weight": 8 * mod_bytes / mod_weights if mod_weights else None}


def _update_config_json(tmp: Path, update: dict) -> None:
    path = tmp / "config.json"
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(update)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


_HOW_TO_LOAD = {
    "dense": """```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{dir}")   # dense weights{zeros}
```""",
    "compressed-tensors": """```python
# pip install compressed-tensors; vLLM serves it as is: vllm serve {dir}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{dir}")   # unpacked to {dtype} on load
# or, with the packed modules kept packed (lmsqueeze's 4-/8-bit kernels): lmsqueeze eval --model {dir}
from lmsqueeze.compressor.packed import load_packed
model, tokenizer, swapped = load_packed("{dir}")
```""",
    "gptq": """```python
# GPTQ layout (quant_method gptq): GPTQModel, vLLM, or transformers with a GPTQ backend installed
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{dir}")
# or with no GPTQ package, the modules kept packed (lmsqueeze's kernels): lmsqueeze eval --model {dir}
from lmsqueeze.compressor.packed import load_packed
model, tokenizer, swapped = load_packed("{dir}")
```""",
    "sparse24": """```python
from lmsqueeze.compressor.packed import load_packed
model, tokenizer, swapped = load_packed("{dir}")   # 2:4 layers stay packed (SparseLinear / Sparse24QuantLinear)
```""",
}


def _model_card(meta: dict, target: Path) -> str:
    sizes = meta.get("sizes", {})
    calib = meta.get("calibration") or {}
    cfg = meta.get("config") or {}
    fmt = sizes.get("format", "dense")
    zeros = (f"; sparsity structure {meta.get('sparsity_structure')}, exact zeros"
             if meta.get("sparsity_structure") else "")
    lines = [
        f"# {target.name}", "",
        f"Compressed with lmsqueeze {meta.get('versions', {}).get('lmsqueeze', '')} from `{meta.get('model')}`.", "",
        f"- method: {meta.get('method')}",
        "- config: " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "method" and v not in ((), [], None)),
        "- calibration: " + (", ".join(f"{k}={v}" for k, v in calib.items() if not isinstance(v, (list, dict)))
                             or "none (data-free)"),
        f"- format: {fmt}" + (f" ({meta.get('sparsity_structure')} sparsity)" if meta.get("sparsity_structure") else ""),
    ]
    if sizes:
        lines.append(f"- size: {sizes['weights_bytes'] / 1e6:.1f} MB of weights ({sizes['fraction_of_bf16']:.1%} of the "
                     f"bf16 model's {sizes['bf16_bytes'] / 1e6:.1f} MB); compressed modules "
                     f"{sizes['bits_per_weight']:.2f} bits per weight, whole checkpoint "
                     f"{sizes['bits_per_param']:.2f} bits per parameter")
    lines += ["", "## How to load", "",
              _HOW_TO_LOAD[fmt].format(dir=target, zeros=zeros, dtype=meta.get("dtype") or "the model dtype"), "",
              f"Per-module sparsity, reconstruction error and timings are in `{METADATA}`.", ""]
    return "\n".join(lines)


def _write_error(target: Path, exc: BaseException) -> LmsqueezeError:
    what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    return LmsqueezeError(f"could not write the checkpoint to '{target}': {what}{where}; "
                          f"nothing there was changed")


def save_compressed(model, tokenizer, directory: str | os.PathLike, report=None, *, config=None,
                    calibration: dict | None = None, model_name: str | None = None, extra: dict | None = None,
                    offload=None, format: str | None = None, grids: dict | None = None) -> dict:
    """Write `model` (and `tokenizer`, if given) to `directory` atomically; returns the metadata written.

    report: the CompressionReport from compress() (its config, modules, timings and calibration are
    recorded); config / calibration may be given instead or in addition. An existing directory is
    replaced only once the new one is complete; a write that fails (disk full, permissions) raises
    one LmsqueezeError naming the directory and the OS error, and leaves the old one as it was.
    offload: the DiskOffload holding the layers (compress with offload): its layer files become the
    checkpoint's shards, no layer is loaded again.
    format: one of formats.FORMATS (None: compressed-tensors for quantizers when `grids` are given,
    dense otherwise); the packed quantized formats need the grids that compress(..., grids=...) kept.
    The directory and its files get the modes open()/mkdir() give under the user's umask (not mkdtemp's 0700).
    """
    from lmsqueeze.compressor import formats
    from lmsqueeze.compressor.config import from_dict

    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise LmsqueezeError(f"output directory '{directory}' exists and is not a directory")
    cfg_obj = config if config is not None else (from_dict(report.config) if report is not None else None)
    if format is None:  # packed when the grids are at hand (compress(..., grids=...)), else dense as before
        format = formats.default_format(cfg_obj) if grids and cfg_obj is not None else "dense"
    plan = (formats.plan(model, cfg_obj, format, offload=offload is not None) if cfg_obj is not None
            else formats.Plan(format or "dense"))
    if cfg_obj is None and plan.format != "dense":
        raise LmsqueezeError(f"--format {plan.format} needs the compression config (pass report= or config=)")
    # schema: this file's layout version (docs/report-schema.md); format: the same, kept for older readers
    meta: dict = {"schema": SCHEMA, "format": "lmsqueeze-compressed/1",
                  "model": model_name or getattr(model.config, "_name_or_path", None)}
    if report is not None:
        meta.update(report.to_dict())
    if config is not None:
        meta["method"], meta["config"] = config.method, config.to_dict()
    if calibration:
        meta["calibration"] = {**meta.get("calibration", {}), **calibration}
    structure = formats.sparsity_structure(cfg_obj) if cfg_obj is not None else None
    if structure:
        meta["sparsity_structure"] = structure
    meta["versions"] = _versions()
    meta.update(extra or {})
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        raise _write_error(target, exc) from None
    try:
        t0 = time.perf_counter()
        packed = formats.pack(model, plan, cfg_obj, grids) if plan.format != "dense" else formats.Packed({}, set())
        if offload is not None:
            offload.save_weights(model, tmp)
        elif packed.tensors:
            state = {k: v for k, v in model.state_dict().items() if k not in packed.replaces}
            state.update(packed.tensors)
            model.save_pretrained(tmp, state_dict=state)
        else:
            model.save_pretrained(tmp)
        update = dict(packed.config)
        if structure:
            update["sparsity_structure"] = structure
        if update:
            _update_config_json(tmp, update)
        if packed.finish is not None:
            packed.finish(str(tmp))
        for name, obj in packed.files.items():
            with open(tmp / name, "w", encoding="utf-8") as f:
                json.dump(obj, f, indent=2)
                f.write("\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _open_up(tmp)
        meta["save_format"] = plan.format
        meta["format_notes"] = plan.notes + packed.notes
        meta["sizes"] = _sizes(tmp, model, plan, packed)
        with open(tmp / "README.md", "w", encoding="utf-8") as f:
            f.write(_model_card(meta, target))
        meta["sizes"]["checkpoint_bytes"] = _dir_bytes(tmp, skip=(METADATA,))
        meta.setdefault("timings", {})["save"] = time.perf_counter() - t0
        with open(tmp / METADATA, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, default=str)
            f.write("\n")
        if target.exists():  # os.replace cannot replace a non-empty directory: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
            raise _write_error(target, exc) from None
        raise
    if report is not None:
        report.timings["save"] = meta["timings"]["save"]
    log.info("saved %s to %s (%s)", meta.get("method"), target, plan.format)
    return meta


def sizes_markdown(meta: dict) -> str:
    """One table row of bytes on disk and bits per weight, for the compress summary."""
    s = meta.get("sizes")
    if not s:
        return ""
    return "\n".join([
        "| format | weights on disk | of bf16 | compressed modules | bits/weight (modules) | bits/param (all) |",
        "|---|---|---|---|---|---|",
        f"| {s['format']} | {s['weights_bytes'] / 1e6:.1f} MB | {s['fraction_of_bf16']:.1%} | {s['compressed_modules']} "
        f"| {s['bits_per_weight']:.2f} | {s['bits_per_param']:.2f} |"])


def load_metadata(directory: str | os.PathLike) -> dict:
    path = Path(directory) / METADATA
    if not path.exists():
        raise LmsqueezeError(f"'{directory}' is not an lmsqueeze checkpoint: it has no {METADATA}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_compressed(directory: str | os.PathLike, dtype=None, device: str = "cpu"):
    """(model, tokenizer or None, metadata) from a directory that save_compressed wrote.

    dtype: None keeps the dtype the checkpoint was saved in.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmsqueeze.compressor.packed import load_packed, packed_format
    from lmsqueeze.models import parse_dtype

    meta = load_metadata(directory)
    if packed_format(directory):  # packed modules stay packed (QuantLinear, SparseLinear, ...): no dense copy
        model, tokenizer, _ = load_packed(directory, device=device)
        if dtype is not None:
            model.to(parse_dtype(dtype))
        return model, tokenizer, meta
    torch_dtype = "auto" if dtype is None else parse_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype).to(device).eval()
    except ImportError as exc:  # a packed checkpoint whose loader package is missing
        raise LmsqueezeError(f"loading '{directory}' ({meta.get('save_format', 'dense')} format) needs a package "
                             f"that is not installed: {str(exc).splitlines()[0]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, meta
