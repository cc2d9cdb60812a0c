"""`lmsqueeze.evaluate(...)`: run evaluation tasks on a model, paired against its base model.

Order of work, so that a mistake costs nothing and two models never share memory:
1. the tasks are parsed and their items loaded and validated (files, data sets, scorer packages);
2. the base model's result of every task comes from the on-disk cache (`evaluation.cache`); the tasks
   it misses run on the base, loaded at most once for all of them, then released;
3. the model is loaded (when named) and every task runs on it with the base's result beside it, for
   paired deltas, flips and divergences.
Everything is returned as one JSON-serialisable report (`SCHEMA` versions it; docs/report-schema.md).
"""
from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lmsqueeze import __version__
from lmsqueeze.errors import DataNotFound, LmsqueezeError
from lmsqueeze.evaluation import cache as _cache
from lmsqueeze.evaluation.backend import Backend
from lmsqueeze.evaluation.task import EvalOptions, TaskUnavailable, parse_tasks

log = logging.getLogger("lmsqueeze")
SCHEMA = "lmsqueeze.eval/2"


def _name_of(model, given: str | None) -> str:
    if given:
        return given
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return str(getattr(model.config, "_name_or_path", "") or type(model).__name__)


def identity_of_name(name: str, dtype: str) -> str:
    """Identity of a model named on the command line, without loading its weights: a local directory is
    its path, config and the size and mtime of its weight files; a builtin or hub id is its name."""
    from lmsqueeze.models import TINY, parse_gguf, resolve

    h = hashlib.sha256(f"{name}|{dtype}".encode())
    if name in TINY:
        return h.hexdigest()
    gguf = parse_gguf(name)
    try:
        path = Path(gguf[0], gguf[1]) if gguf else Path(resolve(name))  # dir::file.gguf: the file itself
    except LmsqueezeError:
        path = Path(name).expanduser()
    target = path if path.is_dir() else path.parent if path.is_file() else None
    if target is not None:
        h.update(str(path.resolve()).encode())
        files = [path] if path.is_file() else sorted(target.iterdir())
        for f in files:
            if f.name == "config.json":
                h.update(f.read_bytes())
            elif f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _load(name: str, dtype, device):
    from lmsqueeze.models import load_model

    return load_model(name, dtype=dtype, device=device)


def _load_tokenizer(name: str):
    """The tokenizer of a model named on the command line, without loading its weights."""
    from lmsqueeze.models import load_tokenizer

    return load_tokenizer(name)


def _config_of(model):
    """A named model's config (no weights loaded), or a loaded model itself."""
    if isinstance(model, (str, os.PathLike)):
        from lmsqueeze.models import load_config

        return load_config(str(model))
    return model


def load_tasks(tasks, opts: EvalOptions, suite: str | None, has_base: bool, skip_unavailable: bool):
    """(tasks whose items loaded, {task name: why it was skipped})."""
    task_list = parse_tasks(tasks, opts, suite=suite, has_base=has_base)
    ready, skipped = [], {}
    for t in task_list:
        if t.needs_base and not has_base:
            raise LmsqueezeError(f"task '{t.name}' compares with a base model: give one (--base)")
        try:
            t.ensure_loaded()
        except (TaskUnavailable, DataNotFound) as exc:
            if not skip_unavailable:
                raise TaskUnavailable(f"task '{t.name}' cannot run: {exc} (--skip-unavailable runs the others "
                                      f"and reports it as skipped)") from None
            log.warning("%s skipped: %s", t.name, exc)
            skipped[t.name] = str(exc)
            continue
        ready.append(t)
    return ready, skipped


def _exact_activations(fn):
    """Packed 4-bit layers (lmsqueeze.qlinear) round a GEMV's activations to int8 by default, for decode speed;
    an evaluation measures what the checkpoint's weights do, so inside it activations stay exact unless the
    user set LMSQUEEZE_QUANT_ACT themselves (=int8 evaluates the fast path)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "LMSQUEEZE_QUANT_ACT" in os.environ:
            return fn(*args, **kwargs)
        os.environ["LMSQUEEZE_QUANT_ACT"] = "fp32"
        try:
            return fn(*args, **kwargs)
        finally:
            os.environ.pop("LMSQUEEZE_QUANT_ACT", None)
    return wrapper


@_exact_activations
def evaluate(model, tokenizer=None, tasks=None, base=None, base_tokenizer=None, *, suite: str | None = None,
             seqlen: int = 512, limit: int | None = None, batch_tokens: int = 4096, topk: int = 64,
             max_new_tokens: int = 128, safety_new_tokens: int = 32, data_dir: str | None = None,
             dtype: str = "fp32", device: str = "cpu", cache_dir: str | None = None, reuse_cache: bool = True,
             model_name: str | None = None, base_name: str | None = None, seed: int = 0,
             chat_template: bool = True, resamples: int = 1000, extra: dict | None = None,
             skip_unavailable: bool = False, log_samples: bool = True) -> dict:
    """Evaluate `model` on `tasks` (and/or a `suite`) and return the report (a dict, JSON-serialisable).

    model / base: a builtin name, local directory, .gguf file or hub id (loaded with `dtype` on `device`), or
        a loaded model with its tokenizer (`tokenizer` / `base_tokenizer`; a loaded model given without one gets
        the tokenizer of the checkpoint it names in name_or_path).
    tasks: "ppl:wikitext2,divergence:wikitext2,piqa,mc:my.jsonl,alpaca,bbq" or a list of such names;
        suite: "core", "safety" or "full" (the tasks that declare it).
    limit: windows or items per task. batch_tokens: token budget of one forward. topk: k of the cached base
        distribution. max_new_tokens / safety_new_tokens: generation lengths (instruction / continuation).
    cache_dir: where base results live (default LMSQUEEZE_CACHE/eval-base); reuse_cache=False recomputes.
    skip_unavailable: report a task that cannot run here (missing package or data) as skipped instead of
        failing. log_samples: keep per-item results and the tasks' sample records (`Task.samples`: prompt,
        reference, output, base output, per-item metrics) in the report; `write_samples` writes them out.
    Raises LmsqueezeError for bad names, files or settings before any model is loaded.
    """
    opts = EvalOptions(seqlen=seqlen, limit=limit, batch_tokens=batch_tokens, topk=topk,
                       max_new_tokens=max_new_tokens, safety_new_tokens=safety_new_tokens, data_dir=data_dir,
                       seed=seed, chat_template=chat_template, resamples=resamples, extra=dict(extra or {}))
    task_list, skipped = load_tasks(tasks if tasks is not None or suite is not None else "ppl:pydoc", opts, suite,
                                    base is not None, skip_unavailable)
    mname, bname = _name_of(model, model_name), (_name_of(base, base_name) if base is not None else None)
    if isinstance(tokenizer, (str, os.PathLike)):  # evaluate("model", "ppl:pydoc") would drop the tasks silently
        raise LmsqueezeError(f"evaluate()'s second argument is the tokenizer, got {str(tokenizer)!r}: give tasks= "
                             f"(and base=) by keyword")
    if not isinstance(model, (str, os.PathLike)) and tokenizer is None:
        # a loaded model without its tokenizer: the one of the checkpoint it came from, as compress() does
        source = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
        if not source:
            raise LmsqueezeError("a loaded model needs its tokenizer: evaluate(model, tokenizer, ...) (this model "
                                 "does not say which checkpoint it came from)")
        tokenizer = _load_tokenizer(str(source))
    if isinstance(model, (str, os.PathLike)):
        tokenizer = _load_tokenizer(str(model))
    for m in (model, base) if base is not None else (model,):
        shape = _config_of(m)
        for t in task_list:
            t.check_model(shape)

    base_results, base_info = {}, {}
    if base is not None:
        base_results, base_info = base_side(task_list, tokenizer, base, base_tokenizer, mname, bname, dtype, device,
                                            Path(cache_dir) if cache_dir else None, reuse_cache, opts)
    if isinstance(model, (str, os.PathLike)):
        model, _ = _load(str(model), dtype, device)
    if base_info.get("logits") is not None:
        _cache.check_same_vocab(_cache.logit_count(model), base_info["logits"], mname, bname)
    backend = Backend(model, tokenizer, batch_tokens=batch_tokens, chat_template=chat_template, name="model")
    results = []
    for t in task_list:
        t0 = time.perf_counter()
        out = t.run(backend, base_results.get(t.name))
        out.pop("rows", None)
        samples = t.samples(out, base_results.get(t.name), backend) if log_samples else None
        entry = {"task": t.name, "kind": t.kind, "summary": out.pop("summary"), "metrics": out.pop("metrics", {}),
                 "seconds": round(time.perf_counter() - t0, 3)}
        if t.name in base_results:
            entry["base_cache"] = base_results[t.name].get("cache")
        entry["details"] = {k: v for k, v in out.items() if k != "items"}
        if log_samples:
            entry["samples"] = samples
            entry["sample_metrics"] = {k: asdict(v) for k, v in t.sample_metrics.items()}
            entry["items"] = out.get("items", [])
            if t.name in base_results:
                entry["base_items"] = base_results[t.name].get("items", [])
        results.append(entry)
    results += [{"task": name, "kind": name.partition(":")[0], "skipped": why} for name, why in skipped.items()]
    p = next(model.parameters())
    return {"schema": SCHEMA, "lmsqueeze": __version__, "model": mname, "base": bname,
            "settings": {"seqlen": seqlen, "limit": limit, "batch_tokens": batch_tokens, "topk": topk,
                         "max_new_tokens": max_new_tokens, "safety_new_tokens": safety_new_tokens, "seed": seed,
                         "chat_template": chat_template, "resamples": resamples,
                         "dtype": str(p.dtype).removeprefix("torch."), "device": str(p.device),
                         "data_dir": data_dir, "torch_threads": torch.get_num_threads()},
            "base_forwards": base_info.get("forwards", 0), "model_forwards": backend.forwards,
            "results": results}


def base_side(task_list, tokenizer, base, base_tokenizer, mname, bname, dtype, device, root, reuse, opts):
    """({task name: the base's result}, info): each task's base result from the cache, or computed on the base
    (loaded once, only when some task misses the cache, and released before returning)."""
    if not isinstance(base, (str, os.PathLike)) and base_tokenizer is None:
        raise LmsqueezeError("a loaded base model needs its tokenizer: evaluate(..., base=b, base_tokenizer=tok)")
    tok_id = _cache.tokenizer_identity(tokenizer)
    base_id = identity_of_name(str(base), dtype) if isinstance(base, (str, os.PathLike)) else \
        _cache.model_identity(base)
    results, info = {}, {"forwards": 0, "logits": None}
    backend = None if isinstance(base, (str, os.PathLike)) else \
        Backend(base, base_tokenizer, opts.batch_tokens, opts.chat_template, name="base")
    try:
        for t in task_list:
            key = {**t.cache_key(), "base": base_id, "tokenizer": tok_id, "chat_template": opts.chat_template}
            path = _cache.cache_path(bname, t.name, key, root)
            cached = _cache.load_cache(path) if reuse else None
            if cached is not None:
                log.info("%s: reusing the base result at %s", t.name, path)
                results[t.name] = cached
                info["logits"] = cached["cache"].get("logits", info["logits"])
                continue
            if backend is None:
                backend = Backend(*_load(str(base), dtype, device), opts.batch_tokens, opts.chat_template, name="base")
            if _cache.tokenizer_identity(backend.tokenizer) != tok_id:
                _cache.check_same_tokenizer(tokenizer, backend.tokenizer, mname, bname)
            before = backend.forwards
            out = t.run(backend, None)
            info["forwards"] += backend.forwards - before
            info["logits"] = _cache.logit_count(backend.model)
            from lmsqueeze import distributed as ddp

            if ddp.is_main():
                _cache.save_cache(path, out, {"base": bname, "task": t.name, "key": key, "logits": info["logits"]})
            out["cache"] = {"path": str(path), "hit": False, "logits": info["logits"]}
            results[t.name] = out
    finally:
        if isinstance(base, (str, os.PathLike)) and backend is not None:
            backend.model = None
            del backend
            gc.collect()
    return results, info


def samples_file(directory: str | os.PathLike, task: str) -> Path:
    """DIRECTORY/samples_<task>.jsonl, the task name made safe for a file name (as lm-evaluation-harness)."""
    return Path(directory) / f"samples_{re.sub(r'[^A-Za-z0-9._-]+', '_', task).strip('_')}.jsonl"


def write_samples(report: dict, directory: str | os.PathLike) -> dict[str, str]:
    """Move every task's sample records out of `report` into DIRECTORY/samples_<task>.jsonl, one JSON line per
    item with the task name; each result keeps the file's path under "samples_file". {task: path}."""
    from lmsqueeze.evaluation.files import write_text_atomic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for r in report["results"]:
        if r.get("samples") is None:
            continue
        path = samples_file(directory, r["task"])
        lines = [json.dumps({"task": r["task"], **s}, default=str, allow_nan=True) for s in r.pop("samples")]
        write_text_atomic(path, "".join(line + "\n" for line in lines))
        r["samples_file"] = written[r["task"]] = str(path)
    return written


def write_report(report: dict, path: str | os.PathLike) -> None:
    from lmsqueeze.io import write_json_atomic

    write_json_atomic(path, report)
