"""`lmsqueeze.evaluate(...)`: run evaluation tasks on a model, optionally against its base model.

The base model (when given) runs first, once per task that uses it, into an on-disk cache
(`basecache`); it is then released, so base and model are never in memory together. Everything is
returned as one JSON-serialisable report with per-item results (`report.render_markdown` prints it).
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from lmsqueeze import __version__
from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation import basecache
from lmsqueeze.evaluation.tasks import EvalOptions, parse_tasks

log = logging.getLogger("lmsqueeze")


def _name_of(model, given: str | None) -> str:
    if given:
        return given
    if isinstance(model, str):
        return model
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


def _identity_of_name(name: str, dtype: str) -> str:
    """Identity of a model named on the command line, without loading its weights: a local directory is
    its path, config and the size and mtime of its weight files; a builtin or hub id is its name."""
    from lmsqueeze.models import SMOLLM2, TINY, resolve

    h = hashlib.sha256(f"{name}|{dtype}".encode())
    if name in TINY:
        return h.hexdigest()
    path = Path(resolve(name)) if name == SMOLLM2 else Path(name).expanduser()
    if path.is_dir():
        h.update(str(path.resolve()).encode())
        for f in sorted(path.iterdir()):
            if f.name == "config.json":
                h.update(f.read_bytes())
            elif f.suffix in (".safetensors", ".bin", ".pt"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _load(name: str, dtype, device):
    from lmsqueeze.models import load_model

    return load_model(name, dtype=dtype, device=device)


# Named task sets (`--suite`); "core" adds divergence only when a base model is given.
SUITES = {
    "core": ("ppl:wikitext2:test", "piqa", "alpaca"),
    "safety": ("bbq", "crows", "dialect", "bold"),
}
SUITES["full"] = SUITES["core"] + SUITES["safety"]


def split_tasks(tasks, suite: str | None, has_base: bool) -> tuple[list[str], list[str]]:
    """(core task names, safety task names) from --tasks and --suite; safety tasks run through run_safety."""
    from lmsqueeze.evaluation.safety.suite import TASKS as SAFETY_TASKS

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else (tasks or [])) if t.strip()]
    if suite is not None:
        if suite not in SUITES:
            raise LmsqueezeError(f"unknown suite '{suite}'; valid: {', '.join(SUITES)}")
        names += list(SUITES[suite])
        if suite in ("core", "full") and has_base:
            names.append("divergence:wikitext2:test")
    core, safety = [], []
    for n in dict.fromkeys(names):
        (safety if n in SAFETY_TASKS else core).append(n)
    if not core and not safety:
        raise LmsqueezeError("no tasks given: use --tasks and/or --suite (core, safety, full)")
    return core, safety


def evaluate(model, tokenizer=None, tasks="ppl:pydoc", base=None, base_tokenizer=None, *, seqlen: int = 512,
             limit: int | None = None, batch_tokens: int = 4096, topk: int = 64, max_new_tokens: int = 128,
             data_dir: str | None = None, dtype: str = "fp32", device: str = "cpu", cache_dir: str | None = None,
             reuse_cache: bool = True, model_name: str | None = None, base_name: str | None = None,
             suite: str | None = None, seed: int = 0, safety_options: dict | None = None) -> dict:
    """Evaluate `model` on `tasks` and return the report (a dict, JSON-serialisable).

    model / base: a builtin name, local directory or hub id (loaded with `dtype` on `device`), or a
        loaded model with its tokenizer (`tokenizer` / `base_tokenizer`).
    tasks: "ppl:wikitext2,divergence:wikitext2,piqa,mc:my.jsonl,alpaca" or a list of such names.
    limit: windows (ppl, divergence) or items (piqa, mc, alpaca) per task.
    batch_tokens: token budget of one forward pass. topk: k of the cached base distribution.
    cache_dir: where base caches live (default LMSQUEEZE_CACHE/eval-base); reuse_cache=False rebuilds.
    """
    opts = EvalOptions(seqlen=seqlen, limit=limit, batch_tokens=batch_tokens, topk=topk,
                       max_new_tokens=max_new_tokens, data_dir=data_dir)
    core_names, safety_names = split_tasks(tasks, suite, base is not None)
    task_list = parse_tasks(core_names, opts) if core_names else []
    if safety_names:
        from lmsqueeze.evaluation.safety.suite import parse_tasks as parse_safety

        parse_safety(safety_names)
    for t in task_list:
        if t.needs_base and base is None:
            raise LmsqueezeError(f"task '{t.name}' compares with a base model: give one (--base)")
    mname, bname = _name_of(model, model_name), (_name_of(base, base_name) if base is not None else None)
    if not isinstance(model, str) and tokenizer is None:
        raise LmsqueezeError("a loaded model needs its tokenizer: evaluate(model, tokenizer, ...)")
    if isinstance(model, str):
        tokenizer = _load_tokenizer(model)
    root = Path(cache_dir) if cache_dir else None

    # The base runs first and is released before the model is loaded: never both in memory.
    caches, cache_paths = {}, {}
    if base is not None:
        caches, cache_paths = _base_caches(task_list, tokenizer, base, base_tokenizer, mname, bname, dtype, device,
                                           root, reuse_cache, opts)
    if isinstance(model, str):
        model, _ = _load(model, dtype, device)
    for c in caches.values():
        basecache.check_same_vocab(basecache.logit_count(model), c.meta["logits"], mname, bname)
    results = []
    for t in task_list:
        t0 = time.perf_counter()
        out = t.run(model, tokenizer, caches.get(t.name))
        entry = {"task": t.name, "summary": out["summary"], "seconds": time.perf_counter() - t0}
        if t.name in cache_paths:
            entry["base_cache"] = str(cache_paths[t.name])
        entry["items"] = out["items"]
        results.append(entry)
    safety = None
    if safety_names:
        safety = _run_safety(model, tokenizer, base, base_tokenizer, safety_names, limit, seed, data_dir, dtype,
                             device, safety_options or {})
    report = {"lmsqueeze": __version__, "model": mname, "base": bname,
            "settings": {"seqlen": seqlen, "limit": limit, "batch_tokens": batch_tokens, "topk": topk,
                         "max_new_tokens": max_new_tokens, "dtype": str(next(model.parameters()).dtype)
                         .removeprefix("torch."), "device": str(next(model.parameters()).device),
                         "data_dir": data_dir, "torch_threads": torch.get_num_threads()},
            "results": results}
    if safety is not None:
        report["safety"] = safety
    return report


def _run_safety(model, tokenizer, base, base_tokenizer, names, limit, seed, data_dir, dtype, device, options):
    """The safety tasks (BBQ, CrowS, dialect, BOLD) on the loaded model and, when given, the base.

    Unlike the core tasks these score model and base item by item for paired deltas, so the base is
    loaded beside the model for their duration (two copies of the weights in memory).
    """
    from lmsqueeze.evaluation.safety import HFBackend, run_safety

    batch = options.pop("batch_size", 8)
    mb = HFBackend(model, tokenizer, batch_size=batch, desc=" model")
    bb = None
    if base is not None:
        if isinstance(base, str):
            b_model, b_tok = _load(base, dtype, device)
        else:
            b_model, b_tok = base, base_tokenizer
        bb = HFBackend(b_model, b_tok, batch_size=batch, desc=" base")
    return run_safety(mb, bb, tasks=names, limit=limit, seed=seed, data_dir=data_dir, **options)


def _load_tokenizer(name: str):
    """The tokenizer of a model named on the command line, without loading its weights."""
    from lmsqueeze.models import TINY, byte_tokenizer, resolve

    if name in TINY:
        return byte_tokenizer()
    path = resolve(name)
    if not os.path.isdir(path):  # a hub id, or a bad name: load_model says what is wrong with it
        return _load(name, "fp32", "cpu")[1]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _base_caches(task_list, tokenizer, base, base_tokenizer, mname, bname, dtype, device, root, reuse, opts):
    users = [t for t in task_list if t.uses_base]
    if not isinstance(base, str) and base_tokenizer is None:
        raise LmsqueezeError("a loaded base model needs its tokenizer: evaluate(..., base=b, base_tokenizer=tok)")
    tok_id = basecache.tokenizer_identity(tokenizer)
    base_id = _identity_of_name(base, dtype) if isinstance(base, str) else basecache.model_identity(base)
    caches, paths = {}, {}
    loaded = None if isinstance(base, str) else (base, base_tokenizer)
    checked = False
    try:
        for t in users:
            reqs = t.requests(tokenizer)
            key = {**t.cache_key(), "base": base_id, "tokenizer": tok_id, "requests": basecache.requests_hash(reqs)}
            path = basecache.cache_path(bname, t.name, key, root)
            paths[t.name] = path
            cached = basecache.load_cache(path) if reuse else None
            if cached is not None and "logits" in cached.meta:
                log.info("%s: reusing the base cache at %s", t.name, path)
                caches[t.name] = cached
                continue
            if loaded is None:
                loaded = _load(base, dtype, device)
            if not checked:
                basecache.check_same_tokenizer(tokenizer, loaded[1], mname, bname)
                checked = True
            meta = {"base": bname, "task": t.name, "key": key}
            caches[t.name] = basecache.build_cache(loaded[0], reqs, path, t.base_topk, meta,
                                                   batch_tokens=opts.batch_tokens, desc=f"base {t.name}")
    finally:
        if isinstance(base, str) and loaded is not None:
            del loaded
            gc.collect()
    return caches, paths


def write_report(report: dict, path: str | os.PathLike) -> None:
    from lmsqueeze.io import write_json_atomic

    write_json_atomic(path, report)
