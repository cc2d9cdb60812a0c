"""Run a study: cell by cell, compress, evaluate against the base model, append one JSON line.

Safety of an interrupted run: a cell's line is written whole (one os.write of the complete line,
then fsync) only after the cell finished, so a kill loses at most the cell in progress. On resume a
torn last line (a kill inside the write) is cut off, and every cell whose key is already in
results.jsonl is skipped. Compressed checkpoints are written only with keep_models, so disk use
stays at one results file plus the shared base-model cache. With log_samples every cell's per-item
sample records go to DIR/samples/<cell key>/samples_<task>.jsonl (`evaluation.api.write_samples`) and
its record lists them under "samples".
"""
from __future__ import annotations

import gc
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from lmsqueeze import __version__
from lmsqueeze.study.grid import Cell, StudySpec, expand_grid

log = logging.getLogger("lmsqueeze")

RESULTS = "results.jsonl"
SCHEMA = "lmsqueeze.study-record/2"
STUDY_SCHEMA = "lmsqueeze.study/1"  # DIR/study.json: the spec and the cells


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

METRIC_FIELDS = ("value", "ci", "n", "base", "delta", "delta_ci", "interval")


def record_metrics(report: dict) -> tuple[dict, list, dict]:
    """(metrics, headline, groups) of one evaluation report, as a study record keeps them.

    metrics: every metric of every task, keyed "TASK/METRIC" (e.g. "ppl:wikitext2:test/ppl"), each
    {value, ci, n, base, delta, delta_ci}; headline: [key, title, format, better] of the metrics each task
    declares as headline, in task order (the table's columns); groups: per-group breakdowns of the tasks
    that declare one, {task: {"metric", "groups": {group: {value, base, delta, ci, delta_ci, n}}}}.
    """
    from lmsqueeze.evaluation.task import headline_of, task_class

    metrics, headline, groups = {}, [], {}
    for r in report["results"]:
        if "skipped" in r:
            continue
        task = r["task"]
        for name, m in r.get("metrics", {}).items():
            metrics[f"{task}/{name}"] = {k: m.get(k) for k in METRIC_FIELDS if k in m}
        same_kind = [x["task"] for x in report["results"] if x.get("kind") == r.get("kind")]
        for h in headline_of(task):
            title = h.title if len(same_kind) == 1 else f"{h.title} ({r['task'].partition(':')[2] or task})"
            headline.append([f"{task}/{h.key}", title, h.fmt, h.better])
        declared = getattr(task_class(task), "groups", None)
        if declared and declared[0] in r.get("details", {}):
            gkey, metric = declared
            groups[task] = {"metric": metric, "groups": {
                g: {k: v.get("metrics", {}).get(metric, {}).get(k) for k in ("value", "base", "delta", "ci",
                                                                                "delta_ci", "n")}
                for g, v in r["details"][gkey].items()}}
    return metrics, headline, groups


# ---- running ----------------------------------------------------------------------------------------

def run_study(spec: StudySpec, output_dir: str | os.PathLike, *, on_cell=None, log_samples: bool = False) -> list[dict]:
    """Run every cell of `spec` not yet in OUTPUT_DIR/results.jsonl; returns all records (old and new).

    on_cell(record) is called after each new cell's line is written (the CLI prints progress with it).
    log_samples: write each new cell's per-item sample records under OUTPUT_DIR/samples/ (module docstring).
    """
    out = Path(output_dir)
    tasks = _check_tasks(spec)  # bad task names, files or missing packages fail before any work
    out.mkdir(parents=True, exist_ok=True)
    cells = expand_grid(spec)
    from lmsqueeze.io import write_json_atomic

    write_json_atomic(out / "study.json", {"schema": STUDY_SCHEMA,
                                           "spec": {k: (list(v) if isinstance(v, tuple) else v)
                                                    for k, v in vars(spec).items()},
                                           "cells": [c.label for c in cells]})
    _repair(out / RESULTS)
    done = {r["key"] for r in read_results(out)}
    todo = [c for c in cells if c.key(spec) not in done]
    foreign = done - {c.key(spec) for c in cells}
    if foreign:
        log.warning("%s holds %d results from other study settings; the report shows them too", out, len(foreign))
    log.info("study: %d cells, %d already done, %d to run", len(cells), len(cells) - len(todo), len(todo))
    if todo:
        # the base model's results of every task, once for all cells, before any compressed model exists
        prepare_base(spec, tasks)
    for i, cell in enumerate(todo):
        log.info("study: cell %d/%d: %s", i + 1, len(todo), cell.label)
        record = run_cell(spec, cell, tasks, out, log_samples=log_samples)
        append_record(out, record)
        if on_cell is not None:
            on_cell(record)
    return read_results(out)


def _eval_kwargs(spec: StudySpec) -> dict:
    return dict(seqlen=spec.eval_seqlen, limit=spec.limit, batch_tokens=spec.batch_tokens, topk=spec.topk,
                max_new_tokens=spec.max_new_tokens, safety_new_tokens=spec.safety_new_tokens,
                data_dir=spec.data_dir, dtype=spec.dtype, device=spec.device, cache_dir=spec.cache_dir,
                seed=spec.seed, chat_template=spec.chat_template, resamples=spec.resamples,
                skip_unavailable=spec.skip_unavailable, extra=spec.task_options())


def _check_tasks(spec: StudySpec) -> list[str]:
    """The study's task names, each parsed and its items loaded (so a bad one fails before any work)."""
    from lmsqueeze.evaluation.api import load_tasks
    from lmsqueeze.evaluation.task import EvalOptions, task_names

    opts = EvalOptions(seqlen=spec.eval_seqlen, limit=spec.limit, data_dir=spec.data_dir, seed=spec.seed,
                       extra=spec.task_options())  # a bad judge or toxicity setting fails here too
    load_tasks(list(spec.tasks), opts, spec.suite, True, spec.skip_unavailable)
    return task_names(list(spec.tasks), spec.suite, True)


def prepare_base(spec: StudySpec, tasks: list[str]) -> dict:
    """Compute (or find cached) the base model's result of every task; returns {"forwards": n}."""
    from lmsqueeze.evaluation.api import _load_tokenizer, base_side, load_tasks
    from lmsqueeze.evaluation.task import EvalOptions

    kw = _eval_kwargs(spec)
    opts = EvalOptions(seqlen=kw["seqlen"], limit=kw["limit"], batch_tokens=kw["batch_tokens"], topk=kw["topk"],
                       max_new_tokens=kw["max_new_tokens"], safety_new_tokens=kw["safety_new_tokens"],
                       data_dir=kw["data_dir"], seed=kw["seed"], chat_template=kw["chat_template"],
                       resamples=kw["resamples"], extra=kw["extra"])
    task_list, _ = load_tasks(tasks, opts, None, True, spec.skip_unavailable)
    tok = _load_tokenizer(spec.model)
    _, info = base_side(task_list, tok, spec.model, None, spec.model, spec.model, spec.dtype, spec.device,
                        Path(spec.cache_dir) if spec.cache_dir else None, True, opts)
    log.info("study: base results ready (%d base forwards)", info["forwards"])
    return info


def run_cell(spec: StudySpec, cell: Cell, tasks: list[str], out: Path, log_samples: bool = False) -> dict:
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
    report = evaluate(model, tok, tasks=tasks, base=spec.model, model_name=f"{spec.model} [{cell.label}]",
                      base_name=spec.model, log_samples=log_samples, **_eval_kwargs(spec))
    samples = {}
    if log_samples:
        from lmsqueeze.evaluation.api import write_samples

        written = write_samples(report, out / "samples" / cell.key(spec))
        samples = {task: str(Path(p).relative_to(out)) for task, p in written.items()}
    metrics, headline, groups = record_metrics(report)
    record = {
        "schema": SCHEMA,
        "key": cell.key(spec), "label": cell.label, "method": cell.method, "sparsity": cell.sparsity,
        "bits": cell.bits, "calib": cell.calib, "model": spec.model, "config": cell.config,
        "calibration": cell.calibration, "eval": spec.eval_settings(), "compression": compression,
        "metrics": metrics, "headline": headline, "groups": groups, "samples": samples,
        "summaries": {r["task"]: r.get("summary", {"skipped": r.get("skipped")}) for r in report["results"]},
        "base_forwards": report["base_forwards"], "model_forwards": report["model_forwards"],
        "eval_seconds": time.perf_counter() - t_eval, "seconds": time.perf_counter() - t0,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lmsqueeze": __version__, "torch_threads": torch.get_num_threads(),
    }
    del model, tok, report
    gc.collect()
    return record
