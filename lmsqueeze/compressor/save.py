"""Save and load compressed models as plain Hugging Face checkpoints plus `lmsqueeze.json`.

The checkpoint is dense with exact zeros (and dequantized values for quantized methods), so any tool
that reads Hugging Face checkpoints loads it. `lmsqueeze.json` records what was done: method and
config, calibration source and size, per-module sparsity and reconstruction error, time per phase,
peak memory, versions. The directory is written beside the target under a temporary name and renamed
into place, so an interrupted save leaves no half-written checkpoint.
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


def save_compressed(model, tokenizer, directory: str | os.PathLike, report=None, *, config=None,
                    calibration: dict | None = None, model_name: str | None = None, extra: dict | None = None,
                    offload=None) -> dict:
    """Write `model` (and `tokenizer`, if given) to `directory` atomically; returns the metadata written.

    report: the CompressionReport from compress() (its config, modules, timings and calibration are
    recorded); config / calibration may be given instead or in addition. An existing directory is
    replaced only once the new one is complete.
    offload: the DiskOffload holding the layers (compress with offload): its layer files become the
    checkpoint's shards, no layer is loaded again.
    """
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise LmsqueezeError(f"output directory '{directory}' exists and is not a directory")
    meta: dict = {"format": "lmsqueeze-compressed/1", "model": model_name or getattr(model.config, "_name_or_path", None)}
    if report is not None:
        meta.update(report.to_dict())
    if config is not None:
        meta["method"], meta["config"] = config.method, config.to_dict()
    if calibration:
        meta["calibration"] = {**meta.get("calibration", {}), **calibration}
    meta["versions"] = _versions()
    meta.update(extra or {})
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        t0 = time.perf_counter()
        if offload is not None:
            offload.save_weights(model, tmp)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if report is not None:
        report.timings["save"] = meta["timings"]["save"]
    log.info("saved %s to %s", meta.get("method"), target)
    return meta


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

    from lmsqueeze.models import parse_dtype

    meta = load_metadata(directory)
    torch_dtype = "auto" if dtype is None else parse_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype).to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, meta
