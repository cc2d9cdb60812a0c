"""Any lm-evaluation-harness task defined by a local YAML file (`lmeval:TASK.yaml`), run on lmsqueeze's backend.

lm-eval builds the requests and scores each document (its prompts, few-shot examples, filters and metrics,
unchanged); our engine answers the requests (`evaluation.lmeval.LmsqueezeLM`). What lm-eval alone cannot
give comes from pairing the per-document values with the base model's on the same documents (the base's
result is cached like every task's): for each per-document metric whose lm-eval aggregate is the mean
over documents (acc, acc_norm, exact_match, ...), its value with an interval (Wilson for 0/1 metrics,
bootstrap otherwise) and the paired delta; for each 0/1 metric, `flips_<metric>` (documents whose value
differs from the base's; `flips` is that of acc, or of the first 0/1 metric). Metrics lm-eval aggregates
otherwise (perplexities, corpus BLEU) are reported as lm-eval computes them, in the summary. `limit` keeps
the first N documents of each task (lm-eval's limit). A YAML that defines several tasks reports the first
one's metrics at the top level and every task's in `by_task`.
Sample records: doc_id, reference = lm-eval's target, metrics = the per-document values (+ flip_<metric>).
"""
from __future__ import annotations

import numpy as np

from lmsqueeze.evaluation.stats import estimate, mean_of, proportion
from lmsqueeze.evaluation.task import Headline, SampleMetric, Task, digest, register, sample


def _binary(values) -> bool:
    return len(values) > 0 and all(v in (0.0, 1.0) for v in values)


def pair_metrics(docs: list[dict], base_docs: list[dict] | None, lm_eval_metrics: dict, resamples: int,
                 seed: int) -> tuple[dict, dict]:
    """(metrics, notes): per-document means with intervals and paired deltas, and flips of 0/1 metrics."""
    keys = [k for k in docs[0] if k not in ("doc_id", "target")] if docs else []
    metrics, notes = {}, {}
    if base_docs is not None and [d["doc_id"] for d in docs] != [d["doc_id"] for d in base_docs]:
        base_docs = None
        notes["pairing"] = "the base's documents differ from the model's; no paired deltas"
    for k in keys:
        vals = np.array([d[k] for d in docs], dtype=np.float64)
        agg = lm_eval_metrics.get(k)
        if agg is None or not np.isclose(vals.mean(), agg):
            notes[k] = f"lm-eval aggregates {k} other than by a mean over documents: {agg} (lm-eval's value)"
            continue
        cols = {k: vals}
        bcols = {k: np.array([d[k] for d in base_docs], dtype=np.float64)} if base_docs is not None else None
        binary = _binary(vals) and (bcols is None or _binary(bcols[k]))
        metrics[k] = estimate(proportion(k) if binary else mean_of(k), cols, bcols, resamples=resamples, seed=seed)
        if binary and bcols is not None:
            flips = (vals != bcols[k]).astype(np.float64)
            for d, f in zip(docs, flips):
                d[f"flip_{k}"] = float(f)
            metrics[f"flips_{k}"] = estimate(proportion("f"), {"f": flips}, resamples=resamples, seed=seed)
    flip_keys = [k for k in metrics if k.startswith("flips_")]
    if flip_keys:
        metrics["flips"] = metrics["flips_acc"] if "flips_acc" in metrics else metrics[flip_keys[0]]
    return metrics, notes


@register("lmeval", usage="lmeval:TASK.yaml", suites=())
class LmEvalTask(Task):
    order = 35
    option_keys = ("limit",)
    headline = (Headline("acc", "lm-eval acc", ".3f", "higher"), Headline("flips", "lm-eval flips", ".3f", "lower"))

    def load(self):
        from lmsqueeze.evaluation.lmeval import load_task_dict, yaml_task_names

        self.names = yaml_task_names(self.arg)
        self.task_dict = load_task_dict(self.arg)  # a missing data file or bad field fails before any model

    def fingerprint(self):
        from pathlib import Path

        return digest([Path(self.arg).read_text(encoding="utf-8"), self.names])

    def run(self, backend, base):
        from lmsqueeze.evaluation.lmeval import run_yaml

        res = run_yaml(backend, self.arg, self.opts.limit, self.task_dict)
        by_task, items = {}, []
        for name, r in res.items():
            bdocs = base["by_task"][name]["docs"] if base is not None and name in base.get("by_task", {}) else None
            metrics, notes = pair_metrics(r["docs"], bdocs, r["metrics"], self.opts.resamples, self.opts.seed)
            by_task[name] = {"metrics": metrics, "lm_eval": r["metrics"], "notes": notes, "docs": r["docs"]}
            items += [{"task": name, **d} for d in r["docs"]]
        first = by_task[next(iter(by_task))]
        summary = {"tasks": list(by_task), "lm_eval": {n: t["lm_eval"] for n, t in by_task.items()},
                   "notes": {n: t["notes"] for n, t in by_task.items() if t["notes"]},
                   "n_docs": {n: len(t["docs"]) for n, t in by_task.items()}}
        return {"summary": summary, "metrics": first["metrics"],
                "by_task": {n: {k: v for k, v in t.items()} for n, t in by_task.items()}, "items": items}

    sample_metrics = {"acc": SampleMetric("acc"), "flips": SampleMetric("flip_acc")}

    def samples(self, result, base, backend):
        base_items = base["items"] if base is not None else None

        def numbers(it):
            return {k: v for k, v in it.items() if k not in ("task", "doc_id", "target")}

        return [sample(i, reference=it["target"], metrics=numbers(it),
                       base_metrics=numbers(base_items[i]) if base_items else None, task=it["task"],
                       lm_eval_doc_id=it["doc_id"])
                for i, it in enumerate(result["items"])]
