"""The Markdown view of a JSON report (`api.evaluate`): one row per (task, metric), value [95% CI], n and,
against the base, its value and the paired delta [CI]; headline metrics first, summary-only numbers after;
last, what the numbers rest on (`evaluation.provenance`: model source, texts, window, n)."""
from __future__ import annotations

import math

from lmsqueeze.evaluation import provenance
from lmsqueeze.evaluation.task import headline_of

# summary entries shown besides the metrics, per task kind ("a.b" for nested ones)
SUMMARY_SHOWN = {
    "ppl": ["word_ppl", "byte_ppl", "bits_per_byte", "tokens", "bytes", "windows"],
    "divergence": ["jsd_upper_bound_mean", "jsd.p95", "jsd.p99", "kl_model_base.mean", "abs_dp_ref_mean", "tokens"],
}


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.{digits}f}"
    return str(v)


def interval(ci, digits: int = 4) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f" [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"


def _ordered(task: str, metrics: dict) -> list[str]:
    head = [h.key for h in headline_of(task) if h.key in metrics]
    return head + [k for k in metrics if k not in head]


def render_markdown(report: dict) -> str:
    with_base = report.get("base") is not None
    head = f"model: {report['model']}" + (f"   base: {report['base']}" if with_base else "")
    cols = "| task | metric | value [95% CI] | n |" + (" base | delta [95% CI] |" if with_base else "")
    lines = [head, "", cols, "|---|---|---|---|" + ("---|---|" if with_base else "")]
    notes, extra = [], []
    for r in report["results"]:
        if "skipped" in r:
            notes.append(f"{r['task']}: skipped: {r['skipped']}")
            continue
        m = r.get("metrics", {})
        for key in _ordered(r["task"], m):
            x = m[key]
            row = f"| {r['task']} | {key} | {fmt(x.get('value'))}{interval(x.get('ci'))} | {x.get('n', '')} |"
            if with_base:
                row += (f" {fmt(x.get('base'))} | {fmt(x.get('delta'))}{interval(x.get('delta_ci'))} |"
                        if "delta" in x else " | |")
            lines.append(row)
        for key in SUMMARY_SHOWN.get(r.get("kind", ""), []):
            v = _get(r["summary"], key)
            if v is not None:
                extra.append(f"| {r['task']} | {key} | {fmt(v)} |")
        s = r["summary"]
        if s.get("truncated_prompts"):
            notes.append(f"{r['task']}: {s['truncated_prompts']} prompts were longer than the model's positions "
                         f"minus the new tokens and were cut from the left")
        if "acc_norm_unit" in s:
            notes.append(f"{r['task']}: acc_norm divides by the {s['acc_norm_unit']} of each choice")
    out = lines
    if extra:
        out += ["", "| task | summary | value |", "|---|---|---|"] + extra
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    out += ["", "What these numbers rest on:"] + provenance.markdown(provenance_of(report))
    samples = [r["samples_file"] for r in report["results"] if r.get("samples_file")]
    if samples:
        out.append("- per-item sample records: " + ", ".join(samples))
    return "\n".join(out)


def provenance_of(report: dict) -> dict:
    """The provenance block (`evaluation.provenance.describe`) of an evaluation report."""
    done = [r for r in report["results"] if "skipped" not in r]
    n = {f"{r['task']}/{k}": m["n"] for r in done for k, m in r.get("metrics", {}).items() if m.get("n") is not None}
    return provenance.describe(report.get("model"), report.get("base"), [r["task"] for r in done],
                               report.get("settings", {}).get("seqlen"), n)
