"""Last-word prediction in the LAMBADA layout (`lambada:FILE`; Paperno et al., 2016).

FILE: JSONL with one `{"text": passage}` a line (the layout of the `lambada_openai` test set; a .txt file is
read as one passage a line). Each passage is split at its last space: context = everything before it,
target = " " + the final word. An item is correct when greedy decoding reproduces the target, i.e. every
target token is the argmax of the model's next-token distribution given the context and the target's
earlier tokens (the backend's `greedy` flag; lm-evaluation-harness's `acc` for LAMBADA). Also the target's
log-likelihood: `ppl` = exp(-mean over items of the target's summed log-prob), as lm-eval reports it, and
`flips` against the base model. Intervals: Wilson (accuracy, flips; Newcombe for the paired accuracy
delta), bootstrap for ppl. `limit` keeps the first N passages.
Sample records: prompt = the context, reference = the target word, output = whether greedy decoding
produced it, metrics {correct, target_logprob[, flip]}; acc and flips are their means, ppl = exp(-mean
target_logprob).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.stats import estimate, proportion
from lmsqueeze.evaluation.task import Headline, SampleMetric, Task, digest, register, sample
from lmsqueeze.io import iter_jsonl, read_text_file


def split_last_word(text: str) -> tuple[str, str]:
    """(context, " " + last word) of a passage; an error when it has no space to split at."""
    text = text.strip()
    at = text.rfind(" ")
    if at <= 0:
        raise LmsqueezeError(f"a LAMBADA passage needs a context and a final word, got {text[:60]!r}")
    return text[:at], text[at:]


def read_passages(path: str | Path) -> list[str]:
    p = Path(path).expanduser()
    if p.suffix == ".jsonl":
        out = []
        for lineno, rec in iter_jsonl(p, "LAMBADA file"):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise LmsqueezeError(f"{p}:{lineno}: expected {{\"text\": passage}} (the LAMBADA layout)")
            out.append(rec["text"])
    elif p.suffix == ".txt":
        out = [ln for ln in read_text_file(p, "LAMBADA file").splitlines() if ln.strip()]
    else:
        raise LmsqueezeError(f"LAMBADA file '{path}': unsupported type '{p.suffix}'; valid: .jsonl, .txt")
    if not out:
        raise LmsqueezeError(f"LAMBADA file '{path}' holds no passages")
    return out


def _ppl(c):
    return np.exp(-np.mean(c["logprob"], -1))


@register("lambada", usage="lambada:FILE", suites=())
class LambadaTask(Task):
    order = 36
    option_keys = ("limit",)
    headline = (Headline("acc", "LAMBADA acc", ".3f", "higher"), Headline("flips", "LAMBADA flips", ".3f", "lower"))
    sample_metrics = {"acc": SampleMetric("correct"), "flips": SampleMetric("flip")}

    def load(self):
        passages = read_passages(self.arg)
        passages = passages[:self.opts.limit] if self.opts.limit is not None else passages
        self.pairs = [split_last_word(t) for t in passages]

    def fingerprint(self):
        return digest(self.pairs)

    def run(self, backend, base):
        res = backend.loglik(self.pairs, desc=f"{self.name} loglik")
        items = [{"context": c, "target": t.strip(), "correct": float(r.greedy), "logprob": r.logprob,
                  "tokens": r.ntokens} for (c, t), r in zip(self.pairs, res)]
        cols = {"correct": np.array([i["correct"] for i in items]), "logprob": np.array([i["logprob"] for i in items])}
        bcols = None
        if base is not None:
            bcols = {k: np.array([i[k] for i in base["items"]]) for k in ("correct", "logprob")}
        kw = dict(resamples=self.opts.resamples, seed=self.opts.seed)
        metrics = {"acc": estimate(proportion("correct"), cols, bcols, **kw), "ppl": estimate(_ppl, cols, bcols, **kw)}
        if bcols is not None:
            flips = (cols["correct"] != bcols["correct"]).astype(np.float64)
            for it, f in zip(items, flips):
                it["flip"] = float(f)
            metrics["flips"] = estimate(proportion("flip"), {"flip": flips}, **kw)
        summary = {"n_items": len(items), "acc": metrics["acc"]["value"], "ppl": metrics["ppl"]["value"]}
        return {"summary": summary, "metrics": metrics, "items": items}

    def samples(self, result, base, backend):
        base_items = base["items"] if base is not None else None

        def numbers(it):
            out = {"correct": it["correct"], "target_logprob": it["logprob"]}
            if "flip" in it:
                out["flip"] = it["flip"]
            return out

        return [sample(i, prompt=it["context"], reference=it["target"], output=bool(it["correct"]),
                       base_output=bool(base_items[i]["correct"]) if base_items else None, metrics=numbers(it),
                       base_metrics=numbers(base_items[i]) if base_items else None)
                for i, it in enumerate(result["items"])]
