"""Run the safety tasks on a model (and a base model to compare with) and build a JSON-able report.

`run_safety(model, base, tasks=...)` draws the same seeded, stratified items for both models, scores
them with each, and reduces: every number comes as {value, ci} and, with a base, {base, delta,
delta_ci} (deltas paired by item), plus per-category/group breakdowns and the per-item results.
A task whose data or optional scorer packages are missing is reported as skipped, with the reason,
and the other tasks still run.
"""
from __future__ import annotations

import logging
import math
import time

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.safety import bbq, crows, data, dialect, harm

log = logging.getLogger("lmsqueeze")

TASKS = ("bbq", "crows", "dialect", "bold")
SUITES = {"safety": TASKS}


def parse_tasks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    out = []
    for name in names:
        expanded = SUITES.get(name, (name,))
        for t in expanded:
            if t not in TASKS:
                raise LmsqueezeError(f"unknown safety task '{t}'; valid: {', '.join(TASKS)} or the suite "
                                     f"{', '.join(SUITES)}")
            if t not in out:
                out.append(t)
    if not out:
        raise LmsqueezeError(f"no safety task given; valid: {', '.join(TASKS)}")
    return out


def _limit_for(limit, task):
    value = limit.get(task) if isinstance(limit, dict) else limit
    if value is not None and value < 1:
        raise LmsqueezeError(f"limit for {task} must be >= 1, got {value}")
    return value


def run_safety(model, base=None, tasks=TASKS, limit: int | dict | None = None, seed: int = 0,
               resamples: int = 1000, data_dir=None, max_new_tokens: int = 32, bbq_norm: str = "char",
               dialect_files: tuple[str, str] | None = None, include_items: bool = True) -> dict:
    """The safety report of `model` (a `ModelBackend`), compared with `base` when given.

    limit: items per task (an int for all, or {task: int}); items are drawn stratified and seeded.
    dialect_files: (AAE file, SAE file) whose perplexity ratio is reported beside the pairs.
    """
    tasks = parse_tasks(tasks)
    if bbq_norm not in bbq.NORMS:
        raise LmsqueezeError(f"unknown BBQ normalisation '{bbq_norm}'; valid: {', '.join(bbq.NORMS)}")
    if max_new_tokens < 1:
        raise LmsqueezeError(f"max new tokens must be >= 1, got {max_new_tokens}")
    if resamples < 0:
        raise LmsqueezeError(f"resamples must be >= 0, got {resamples}")
    file_lines = None
    if dialect_files is not None:
        if len(dialect_files) != 2:
            raise LmsqueezeError(f"dialect files: expected two (AAE, SAE), got {len(dialect_files)}")
        file_lines = [data.text_lines(p) for p in dialect_files]
    if isinstance(limit, dict):
        unknown = sorted(set(limit) - set(TASKS))
        if unknown:
            raise LmsqueezeError(f"limit given for unknown tasks {unknown}; valid: {', '.join(TASKS)}")
    for t in tasks:
        _limit_for(limit, t)
    stats = dict(resamples=resamples, seed=seed)
    settings = {"tasks": tasks, "limit": limit, "seed": seed, "resamples": resamples,
                "max_new_tokens": max_new_tokens, "bbq_norm": bbq_norm,
                "compared_with_base": base is not None,
                "interval": "95% percentile bootstrap over items; deltas paired by item"}
    report = {"settings": settings, "tasks": {}}

    def both(fn, *args, **kwargs):
        res = fn(model, *args, **kwargs)
        return res, (fn(base, *args, **kwargs) if base is not None else None)

    for task in tasks:
        start = time.perf_counter()
        n = _limit_for(limit, task)
        try:
            if task == "bbq":
                items, unresolved = bbq.prepare(data.bbq_items(data_dir), n, seed)
                res, base_res = both(bbq.score, items, norm=bbq_norm)
                out = bbq.summarize(res, base_res, unresolved=unresolved, **stats)
                out["template"] = bbq.TEMPLATE + "  +  ' {option}'"
            elif task == "crows":
                rows = crows.prepare(data.crows_pairs(data_dir), n, seed)
                res, base_res = both(crows.score, rows)
                out = crows.summarize(res, base_res, **stats)
            elif task == "dialect":
                pairs = dialect.prepare(data.dialect_pairs(data_dir), n, seed)
                res, base_res = both(dialect.score, pairs)
                out = dialect.summarize(res, base_res, **stats)
                if file_lines is not None:
                    fres, fbase = both(dialect.score_files, *file_lines)
                    out["files"] = {"aae": str(dialect_files[0]), "sae": str(dialect_files[1]),
                                    **dialect.summarize_files(fres, fbase, **stats)}
            else:
                scorers = harm.Scorers()  # fails first, before any generation, when packages are missing
                all_prompts, empty = data.bold_prompts(data_dir)
                prompts = harm.prepare(all_prompts, n, seed)
                res = harm.score(model, prompts, scorers, max_new_tokens, fluency_backend=base)
                base_res = harm.score(base, prompts, scorers, max_new_tokens) if base is not None else None
                under = "base model" if base is not None else "model itself"
                out = harm.summarize(res, base_res, fluency_under=under, **stats)
                out["empty_prompts_left_out"] = empty
        except LmsqueezeError as exc:
            log.warning("%s skipped: %s", task, exc)
            report["tasks"][task] = {"skipped": str(exc)}
            continue
        out["seconds"] = round(time.perf_counter() - start, 2)
        if include_items:
            out["items"] = res
            if base_res is not None:
                out["base_items"] = base_res
        report["tasks"][task] = out
    return report


# ---- markdown ---------------------------------------------------------------------------------------------

def _num(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _cell(m: dict, key: str, ci_key: str, digits=3) -> str:
    v, ci = m.get(key), m.get(ci_key) or [None, None]
    if v is None:
        return "n/a"
    return f"{_num(v, digits)} [{_num(ci[0], digits)}, {_num(ci[1], digits)}]"


def _rows(prefix: str, metrics: dict, with_base: bool) -> list[str]:
    rows = []
    for name, m in metrics.items():
        digits = 2 if "ppl" in name else 3
        row = f"| {prefix} | {name} | {_cell(m, 'value', 'ci', digits)} |"
        if with_base:
            row += f" {_num(m.get('base'), digits)} | {_cell(m, 'delta', 'delta_ci', digits)} |"
        rows.append(row + f" {m.get('n', '')} |")
    return rows


def render_markdown(report: dict) -> str:
    with_base = report["settings"]["compared_with_base"]
    head = "| task | metric | value [95% CI] |" + (" base | delta [95% CI] |" if with_base else "") + " n |"
    sep = "|---|---|---|" + ("---|---|" if with_base else "") + "---|"
    lines = [head, sep]
    notes = []
    for task, out in report["tasks"].items():
        if "skipped" in out:
            lines.append(f"| {task} | skipped | {out['skipped']} |" + (" | |" if with_base else "") + " |")
            continue
        lines += _rows(task, out["metrics"], with_base)
        if task == "bbq":
            for cat, b in out["by_category"].items():
                shown = ("acc_ambig", "acc_disambig", "s_amb", "s_dis")
                lines += _rows(f"bbq/{cat}", {k: b["metrics"][k] for k in shown}, with_base)
            if out["n_unresolved"]:
                notes.append(f"bbq: {out['n_unresolved']} items could not be resolved and were left out: "
                             f"{out['unresolved']}")
            else:
                notes.append("bbq: every item resolved (biased option found from stereotyped_groups)")
        elif task == "crows":
            for bt, b in out["by_bias_type"].items():
                lines += _rows(f"crows/{bt}", {"stereo_share": b["metrics"]["stereo_share"]}, with_base)
        elif task == "dialect" and "files" in out:
            lines += _rows("dialect/files", out["files"]["metrics"], with_base)
        elif task == "bold":
            for dom, b in out["by_domain"].items():
                lines += _rows(f"bold/{dom}", {k: b["metrics"][k] for k in ("offensive_rate", "negative_rate",
                                                                             "fluency_ppl")}, with_base)
                lines += _rows(f"bold/{dom} group gap", {k: b["group_gap"][k] for k in ("negative_rate",)
                                                         if k in b["group_gap"]}, with_base)
            notes.append("bold: fluency_ppl is the continuations' perplexity under the "
                         + out["fluency_under"])
        notes.append(f"{task}: {out.get('n_items', '')} items in {out['seconds']} s")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])
