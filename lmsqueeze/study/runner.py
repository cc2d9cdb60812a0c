"""Run a study: cell by cell, compress, evaluate against the base model, append one JSON line.

Safety of an interrupted run: a cell's line is written whole (one os.write of the complete line,
then fsync) only after the cell finished, so a kill loses at most the cell in progress. On resume a
torn last line (a kill inside the write) is cut off, and every cell whose key is already in
results.jsonl is skipped. Compressed checkpoints are written only with keep_models, so disk use
stays at one results file plus the shared base-model cache.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lmsqueeze import __version__
from lmsqueeze.study.grid import Cell, StudySpec, expand_grid

log = logging.getLogger("lmsqueeze")

RESULTS = "results.jsonl"
RESAMPLES = 1000


# ---- results.jsonl ----------------------------------------------------------------------------------

def read_results(directory: str | os.PathLike) -> list[dict]:
    """The complete records of DIR/results.jsonl (a torn last line, from a killed write, is ignored)."""
    path = Path(directory) / RESULTS
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s: ignoring an incomplete line (an interrupted write)", path)
            continue
        if isinstance(rec, dict) and "key" in rec:
            out.append(rec)
    return out


def _repair(path: Path) -> None:
    """Cut a torn last line so the next append starts on a line of its own."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: cutting an incomplete last line (%d bytes) left by an interrupted run", path,
                    len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())


def append_record(directory: str | os.PathLike, record: dict) -> None:
    """Append one record as one complete line: a single write of the whole line, then fsync."""
    path = Path(directory) / RESULTS
    line = (json.dumps(record, default=str, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        view = memoryview(line)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- metrics ----------------------------------------------------------------------------------------

def _ci(values, weights=None, stat="ratio", seed: int = 0) -> list[float | None]:
    """95% percentile bootstrap interval over items of sum(values)/sum(weights) (weights 1: a mean)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return [None, None]
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, v.size, size=(RESAMPLES, v.size))
    r = v[idx].sum(1) / np.maximum(w[idx].sum(1), 1e-12)
    if stat == "exp":
        r = np.exp(r)
    lo, hi = np.percentile(r, [2.5, 97.5])
    return [float(lo), float(hi)]


def _m(value, ci=None, base=None) -> dict:
    out = {"value": value, "ci": ci if ci is not None else [None, None]}
    if base is not None:
        out["base"] = base
    return out


def core_metrics(results: list[dict], seed: int = 0) -> dict:
    """Headline metrics of the core tasks, each {value, ci[, base]}; the intervals bootstrap over items
    (windows for ppl and divergence, questions for piqa and alpaca)."""
    out = {}
    for r in results:
        kind, s, items = r["task"].split(":", 1)[0], r["summary"], r.get("items", [])
        if kind == "ppl":
            out["ppl"] = _m(s["ppl"], _ci([i["nll"] for i in items], [i["tokens"] for i in items], "exp", seed))
        elif kind == "divergence":
            out["jsd"] = _m(s["jsd"]["mean"], _ci([sum(i["jsd"]) for i in items], [len(i["jsd"]) for i in items],
                                                   seed=seed))
            out["top1"] = _m(s["top1_agreement"], _ci([sum(i["top1"]) for i in items],
                                                      [len(i["top1"]) for i in items], seed=seed))
            out["kl"] = _m(s["kl_base_model"]["mean"])
        elif kind in ("piqa", "mc"):
            p = "piqa" if kind == "piqa" else r["task"]
            out[f"{p}_acc"] = _m(s["acc"], _ci([float(i["correct"]) for i in items], seed=seed), s.get("base_acc"))
            if "flips" in s:
                out[f"{p}_flips"] = _m(s["flips"], _ci([float(i["flip"]) for i in items], seed=seed))
        elif kind == "alpaca":
            for k in ("em", "f1", "rougeL"):
                out[f"alpaca_{k}"] = _m(s[k], _ci([i[k] for i in items], seed=seed))
    return out


# the safety metrics shown in the table (task, metric); every metric is kept in the record
SAFETY_HEADLINE = [("bbq", "accuracy"), ("bbq", "s_amb"), ("crows", "stereo_share"), ("dialect", "nll_gap"),
                   ("bold", "offensive_rate"), ("bold", "negative_rate")]
# per-group breakdowns for the heat maps: task -> (group key, metric)
SAFETY_GROUPS = {"bbq": ("by_category", "accuracy"), "crows": ("by_bias_type", "stereo_share"),
                 "bold": ("by_group", "negative_rate")}


def safety_metrics(safety: dict) -> tuple[dict, dict]:
    """(metrics, groups): every safety metric as {value, ci, base, delta, delta_ci} named task_metric, and
    the per-group values of the heat-map metrics, {task: {group: {value, base, delta}}}."""
    metrics, groups = {}, {}
    for task, res in safety.get("tasks", {}).items():
        for name, m in res.get("metrics", {}).items():
            metrics[f"{task}_{name}"] = {k: m.get(k) for k in ("value", "ci", "base", "delta", "delta_ci", "n")}
        if task in SAFETY_GROUPS:
            gkey, metric = SAFETY_GROUPS[task]
            groups[task] = {"metric": metric, "groups": {
                g: {k: v.get("metrics", {}).get(metric, {}).get(k) for k in ("value", "base", "delta")}
                for g, v in res.get(gkey, {}).items()}}
    return metrics, groups


# ---- running ----------------------------------------------------------------------------------------

def run_study(spec: StudySpec, output_dir: str | os.PathLike, *, on_cell=None) -> list[dict]:
    """Run every cell of `spec` not yet in OUTPUT_DIR/results.jsonl; returns all records (old and new).

    on_cell(record) is called after each new cell's line is written (the CLI prints progress with it).
    """
    from lmsqueeze.evaluation.api import split_tasks
    from lmsqueeze.evaluation.safety import parse_tasks as parse_safety
    from lmsqueeze.evaluation.tasks import parse_tasks

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    core, safety = split_tasks(list(spec.tasks), spec.suite, True)  # bad task names fail before any work
    if core:
        parse_tasks(core)
    if safety:
        parse_safety(safety)
    cells = expand_grid(spec)
    from lmsqueeze.io import write_json_atomic

    write_json_atomic(out / "study.json", {"spec": {k: (list(v) if isinstance(v, tuple) else v)
                                                    for k, v in vars(spec).items()},
                                           "cells": [c.label for c in cells]})
    _repair(out / RESULTS)
    done = {r["key"] for r in read_results(out)}
    todo = [c for c in cells if c.key(spec) not in done]
    foreign = done - {c.key(spec) for c in cells}
    if foreign:
        log.warning("%s holds %d results from other study settings; the report shows them too", out, len(foreign))
    log.info("study: %d cells, %d already done, %d to run", len(cells), len(cells) - len(todo), len(todo))
    for i, cell in enumerate(todo):
        log.info("study: cell %d/%d: %s", i + 1, len(todo), cell.label)
        record = run_cell(spec, cell, core + safety, out)
        append_record(out, record)
        if on_cell is not None:
            on_cell(record)
    return read_results(out)


def run_cell(spec: StudySpec, cell: Cell, tasks: list[str], out: Path) -> dict:
    """Load the base model fresh, compress it as the cell says, evaluate it against the base; the record."""
    import torch

    from lmsqueeze.compressor import compress, from_dict, save_compressed
    from lmsqueeze.data import calibration_batches
    from lmsqueeze.evaluation.api import evaluate
    from lmsqueeze.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(spec.model, dtype=spec.dtype, device="cpu")
    compression = None
    if cell.method != "dense":
        config = from_dict(cell.config)
        calib = None
        if cell.calibration is not None:
            c = cell.calibration
            calib = calibration_batches(tok, c["source"], c["nsamples"], c["seqlen"], c["seed"],
                                        data_dir=spec.data_dir)
        # data-free methods have no calibration to measure reconstruction error on
        rep = compress(model, config, calib, device=spec.device, batch_size=spec.batch_size,
                       measure_error=calib is not None, calibration_info=cell.calibration)
        compression = {"seconds": sum(rep.timings.values()), "timings": rep.timings,
                       "mean_sparsity": rep.mean("sparsity"), "mean_recon_error": rep.mean("recon_error"),
                       "peak_rss_mib": rep.peak_rss_mib, "modules": len(rep.modules)}
        if spec.keep_models:
            where = out / "models" / cell.key(spec)
            save_compressed(model, tok, where, rep, model_name=spec.model, extra={"dtype": spec.dtype})
            compression["checkpoint"] = str(where)
        del calib
    t_eval = time.perf_counter()
    report = evaluate(model, tok, tasks=tasks, base=spec.model, seqlen=spec.eval_seqlen, limit=spec.limit,
                      batch_tokens=spec.batch_tokens, topk=spec.topk, max_new_tokens=spec.max_new_tokens,
                      data_dir=spec.data_dir, dtype=spec.dtype, device=spec.device, cache_dir=spec.cache_dir,
                      model_name=f"{spec.model} [{cell.label}]", base_name=spec.model, seed=spec.seed,
                      safety_options={"max_new_tokens": spec.safety_new_tokens})
    metrics = core_metrics(report["results"], spec.seed)
    groups = {}
    if "safety" in report:
        s_metrics, groups = safety_metrics(report["safety"])
        metrics.update(s_metrics)
    record = {
        "key": cell.key(spec), "label": cell.label, "method": cell.method, "sparsity": cell.sparsity,
        "bits": cell.bits, "calib": cell.calib, "model": spec.model, "config": cell.config,
        "calibration": cell.calibration, "eval": spec.eval_settings(), "compression": compression,
        "metrics": metrics, "safety_groups": groups,
        "summaries": {r["task"]: r["summary"] for r in report["results"]},
        "eval_seconds": time.perf_counter() - t_eval, "seconds": time.perf_counter() - t0,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lmsqueeze": __version__, "torch_threads": torch.get_num_threads(),
    }
    del model, tok, report
    gc.collect()
    return record
