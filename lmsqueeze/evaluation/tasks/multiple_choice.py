"""Multiple choice (`piqa`, `mc:FILE.jsonl`): accuracy, length-normalised accuracy, flips, choice KL.

An item is (context, choices, label). Each choice is scored as the continuation " " + choice of the
context (the backend's rules: start token once, trailing whitespace of the context moves to the
continuation):
    pred      = argmax_c logprob(choice_c | context)
    pred_norm = argmax_c logprob(choice_c | context) / characters of choice_c   (as lm-evaluation-harness)
    flip      = the item's correctness differs from the base model's on the same item
    choice_kl = KL(P_base || P_model) over the choices, P = softmax of the choices' logprobs.
Intervals: Wilson for accuracy and flips, Newcombe's paired interval for the accuracy delta, bootstrap
for choice KL.
Sample records: prompt = the context, reference = the right choice, output / base_output = the choice each
model picked, metrics {correct, correct_norm[, flip, choice_kl]}: every metric is their mean.

Sources: PIQA (`piqa`, the labelled validation set: context "Question: <goal>\\nAnswer:", the two
solutions) and any JSONL file of {"context": str, "choices": [str, ...], "label": int} lines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.stats import estimate, mean_of, proportion
from lmsqueeze.evaluation.task import Headline, SampleMetric, Task, digest, register, sample

NORM_UNIT = "characters"


@dataclass
class MCItem:
    context: str
    choices: list[str]
    label: int


def load_jsonl(path: str | Path) -> list[MCItem]:
    """Items of a {context, choices, label} JSONL file; a bad line is reported with its number."""
    from lmsqueeze.io import iter_jsonl

    items = []
    for lineno, rec in iter_jsonl(path, "multiple-choice file"):
        where = f"{path}:{lineno}"
        if not isinstance(rec, dict):
            raise LmsqueezeError(f"{where}: expected an object with context, choices, label; got "
                                 f"{type(rec).__name__}")
        missing = [k for k in ("context", "choices", "label") if k not in rec]
        if missing:
            raise LmsqueezeError(f"{where}: missing {', '.join(missing)}; each line needs context, choices, label")
        ctx, choices, label = rec["context"], rec["choices"], rec["label"]
        if not isinstance(ctx, str):
            raise LmsqueezeError(f"{where}: context must be a string, got {type(ctx).__name__}")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise LmsqueezeError(f"{where}: choices must be a list of at least 2 non-empty strings")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise LmsqueezeError(f"{where}: label must be an integer in 0..{len(choices) - 1}, got {label!r}")
        items.append(MCItem(ctx, choices, label))
    if not items:
        raise LmsqueezeError(f"multiple-choice file '{path}' holds no items")
    return items


def piqa_items(data_dir=None) -> list[MCItem]:
    from lmsqueeze.data import piqa_records

    recs = piqa_records(data_dir)
    if any("label" not in r for r in recs):
        raise LmsqueezeError("PIQA labels (valid-labels.lst beside valid.jsonl) are missing")
    return [MCItem(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"])) for r in recs]


def _argmax(xs):
    return max(range(len(xs)), key=lambda j: (xs[j], -j))


def _log_softmax(xs):
    m = max(xs)
    z = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - z for x in xs]


def score(items: list[MCItem], logprobs: list[list[float]], base_items: list[dict] | None, resamples: int,
          seed: int) -> dict:
    """Summary, metrics and per-item results from each item's choice log-probs (and the base's items)."""
    per = []
    for i, (it, lps) in enumerate(zip(items, logprobs)):
        pred = _argmax(lps)
        pred_norm = _argmax([lp / max(1, len(ch)) for lp, ch in zip(lps, it.choices)])
        row = {"item": i, "label": it.label, "logprobs": lps, "pred": pred, "pred_norm": pred_norm,
               "correct": int(pred == it.label), "correct_norm": int(pred_norm == it.label)}
        if base_items is not None:
            b = base_items[i]
            row["base_correct"] = b["correct"]
            row["flip"] = int(b["correct"] != row["correct"])
            lp_b, lp_m = _log_softmax(b["logprobs"]), _log_softmax(lps)
            row["choice_kl"] = max(0.0, sum(math.exp(a) * (a - c) for a, c in zip(lp_b, lp_m)))
        per.append(row)
    cols = {k: np.array([r[k] for r in per], dtype=np.float64) for k in ("correct", "correct_norm")}
    bcols = None
    if base_items is not None:
        bcols = {k: np.array([r[k] for r in base_items], dtype=np.float64) for k in ("correct", "correct_norm")}
    metrics = {"acc": estimate(proportion("correct"), cols, bcols, resamples=resamples, seed=seed),
               "acc_norm": estimate(proportion("correct_norm"), cols, bcols, resamples=resamples, seed=seed)}
    summary = {"items": len(per), "acc": metrics["acc"]["value"], "acc_norm": metrics["acc_norm"]["value"],
               "acc_norm_unit": NORM_UNIT}
    if base_items is not None:
        fcols = {"flip": np.array([r["flip"] for r in per], dtype=np.float64),
                 "choice_kl": np.array([r["choice_kl"] for r in per], dtype=np.float64)}
        metrics["flips"] = estimate(proportion("flip"), fcols, resamples=resamples, seed=seed)
        metrics["choice_kl"] = estimate(mean_of("choice_kl"), fcols, resamples=resamples, seed=seed)
        summary.update(base_acc=metrics["acc"]["base"], flips=metrics["flips"]["value"],
                       flips_count=int(fcols["flip"].sum()), choice_kl_mean=metrics["choice_kl"]["value"],
                       choice_kl_median=float(np.median(fcols["choice_kl"])) if per else None)
    return {"summary": summary, "metrics": metrics, "items": per}


class MultipleChoiceTask(Task):
    headline = (Headline("acc", "acc", ".3f", "higher"), Headline("flips", "flips", ".3f", "lower"))
    sample_metrics = {"acc": SampleMetric("correct"), "acc_norm": SampleMetric("correct_norm"),
                      "flips": SampleMetric("flip"), "choice_kl": SampleMetric("choice_kl")}

    def read_items(self) -> list[MCItem]:
        raise NotImplementedError

    def load(self):
        items = self.read_items()
        self.items = items[:self.opts.limit] if self.opts.limit is not None else items

    def fingerprint(self):
        return digest([[it.context, it.choices, it.label] for it in self.items])

    def run(self, backend, base):
        pairs = [(it.context, " " + ch) for it in self.items for ch in it.choices]
        res = backend.loglik(pairs, desc=self.name)
        lps, at = [], 0
        for it in self.items:
            lps.append([r.logprob for r in res[at:at + len(it.choices)]])
            at += len(it.choices)
        return score(self.items, lps, base["items"] if base is not None else None, self.opts.resamples,
                     self.opts.seed)

    def samples(self, result, base, backend):
        keys = ("correct", "correct_norm", "flip", "choice_kl")
        base_items = base["items"] if base is not None else None
        out = []
        for i, (it, r) in enumerate(zip(self.items, result["items"])):
            b = base_items[i] if base_items else None
            out.append(sample(i, prompt=it.context, reference=it.choices[it.label], output=it.choices[r["pred"]],
                              base_output=it.choices[b["pred"]] if b else None,
                              metrics={k: r[k] for k in keys if k in r},
                              base_metrics={k: b[k] for k in keys[:2]} if b else None,
                              choices=it.choices, label=it.label, logprobs=r["logprobs"]))
        return out


@register("piqa", suites=("core",))
class PiqaTask(MultipleChoiceTask):
    order = 30
    headline = (Headline("acc", "PIQA acc", ".3f", "higher"), Headline("flips", "PIQA flips", ".3f", "lower"))
    def read_items(self):
        return piqa_items(self.opts.data_dir)


@register("mc", usage="mc:FILE.jsonl")
class JsonlTask(MultipleChoiceTask):
    order = 30
    def read_items(self):
        if not self.arg.endswith(".jsonl"):
            raise LmsqueezeError(f"task 'mc:{self.arg}': expected a .jsonl file of "
                                 f'{{"context", "choices", "label"}} lines')
        return load_jsonl(self.arg)
