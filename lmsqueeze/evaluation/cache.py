"""Base-model results on disk: every task's result on the base model, computed once and reused.

A study evaluates many compressed models against one base model; the base's answers (log-likelihoods,
generations with their seeds, top-k log-probs) depend only on the base, the task and its settings, so
they are computed once and read back for every cell. A cache entry is one directory under
LMSQUEEZE_CACHE/eval-base/ holding the task's result on the base (`result.json`: summary, metrics,
per-item values), the tensors beside it (`rows.safetensors`, e.g. the top-k rows of divergence:
top_logp [N, k] fp32, top_idx [N, k] int32, log_tail [N] fp32, target_logp [N] fp32; 8k + 8 bytes a
token) and `meta.json`. Its name carries the base and task, and a hash of the key: the base model's
identity (path, config and a checksum of its weights, or of the files of a directory), its tokenizer,
the task's settings and a hash of its items, and the backend settings that change answers (chat
template on or off). Written to a temporary directory and renamed, so an interrupted run leaves nothing
half written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from lmsqueeze.errors import LmsqueezeError

log = logging.getLogger("lmsqueeze")
FORMAT = 2


def model_identity(model) -> str:
    """A hash of what makes a model's outputs: its path/name, config and a checksum of every weight tensor
    (sum and sum of squares of its first 65536 elements), so a pruned copy never matches its base."""
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.reshape(-1)[:65536].double()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{flat.sum().item():.10e}:{(flat * flat).sum().item():.10e}"
                     .encode())
    return h.hexdigest()


def tokenizer_identity(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def logit_count(model) -> int:
    """How many logits the model produces per token (its output vocabulary)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_same_tokenizer(tokenizer, base_tokenizer, model_name="model", base_name="base") -> None:
    """Divergence compares distributions token by token: both must use one vocabulary."""
    if tokenizer_identity(tokenizer) != tokenizer_identity(base_tokenizer):
        raise LmsqueezeError(f"'{model_name}' and base '{base_name}' use different tokenizers: divergence needs a "
                             f"model with the same tokenizer as its base")


def check_same_vocab(model_logits: int, base_logits: int, model_name="model", base_name="base") -> None:
    if model_logits != base_logits:
        raise LmsqueezeError(f"'{model_name}' has a vocabulary of {model_logits} logits but base '{base_name}' has "
                             f"{base_logits}: divergence needs a model with the same tokenizer as its base")


def cache_root() -> Path:
    from lmsqueeze.models import cache_dir

    return cache_dir() / "eval-base"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_")[:60] or "x"


def cache_path(base_name: str, task: str, key: dict, root: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return (root or cache_root()) / f"{_slug(Path(base_name).name or base_name)}-{_slug(task)}-{digest}"


def load_cache(path: Path) -> dict | None:
    """The cached base result at `path`, or None when there is none (or it is of another format)."""
    meta_p = path / "meta.json"
    if not meta_p.exists():
        return None
    try:
        meta = json.loads(meta_p.read_text())
        if meta.get("format") != FORMAT:
            return None
        result = json.loads((path / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring an unreadable base cache at %s", path)
        return None
    if (path / "rows.safetensors").exists():
        from safetensors.torch import load_file

        result["rows"] = load_file(str(path / "rows.safetensors"))
    result["cache"] = {"path": str(path), "hit": True, **{k: meta[k] for k in ("logits",) if k in meta}}
    return result


def save_cache(path: Path, result: dict, meta: dict) -> None:
    """Write a base result atomically (temporary directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        rows = result.get("rows")
        if rows:
            from safetensors.torch import save_file

            save_file({a: t.contiguous() for a, t in rows.items()}, str(tmp / "rows.safetensors"))
        body = {k: v for k, v in result.items() if k not in ("rows", "cache")}
        (tmp / "result.json").write_text(json.dumps(body, default=str))
        (tmp / "meta.json").write_text(json.dumps({**meta, "format": FORMAT}, indent=2, default=str))
        os.chmod(tmp, 0o755)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("base cache written: %s", path)
