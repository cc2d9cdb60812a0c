"""Reports are JSON first (see api.evaluate); the table printed on stdout is rendered from that JSON."""
from __future__ import annotations

import math

# per task kind: the summary entries shown in the table, in order (nested ones as "a.b")
_SHOWN = {
    "ppl": ["ppl", "word_ppl", "byte_ppl", "bits_per_byte", "tokens", "windows"],
    "divergence": ["jsd.mean", "jsd_upper_bound_mean", "jsd.median", "jsd.p95", "jsd.p99", "kl_base_model.mean",
                   "kl_base_model.p99",
                   "kl_model_base.mean", "kl_model_base.p99", "top1_agreement", "abs_dp_ref_mean", "dp_ref.mean",
                   "tokens", "topk"],
    "piqa": ["acc", "acc_norm", "base_acc", "flips", "choice_kl_mean", "items"],
    "mc": ["acc", "acc_norm", "base_acc", "flips", "choice_kl_mean", "items"],
    "alpaca": ["em", "f1", "rouge1", "rougeL", "reference_nll", "reference_divergence.jsd.mean",
               "reference_divergence.top1_agreement", "items"],
}


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        elif not isinstance(v, (list, str)):
            out.append((prefix + k, v))
    return out


def render_markdown(report: dict) -> str:
    """One row per (task, metric): the headline numbers of each task; everything else is in the JSON."""
    head = f"model: {report['model']}" + (f"   base: {report['base']}" if report.get("base") else "")
    lines = [head, "", "| task | metric | value |", "|---|---|---|"]
    for r in report["results"]:
        kind = r["task"].split(":", 1)[0]
        shown = _SHOWN.get(kind)
        pairs = [(m, _get(r["summary"], m)) for m in shown] if shown else _flatten(r["summary"])
        for m, v in pairs:
            if v is not None:
                lines.append(f"| {r['task']} | {m} | {_fmt(v)} |")
    return "\n".join(lines)
