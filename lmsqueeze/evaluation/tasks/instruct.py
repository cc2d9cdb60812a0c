"""Instruction following from any file (`instruct:FILE`): the `alpaca` task's protocol on a seeded sample of a
user's instruction data, plus the pairwise judge when one is given.

FILE: `alpaca`, or a file (.json list, .jsonl, either gzip-compressed; `data.instruction_records`) in one of
the layouts:
- flat records `{"instruction", "input" (optional), "output"}` (Alpaca, Dolly-like files);
- the Unnatural Instructions layout (Honovich et al., 2023): `{"instruction", "instances": [{
  "instruction_with_input", "input", "constraints", "output"}, ...]}`; every instance is one item whose
  prompt is its `instruction_with_input` (else the instruction and input) followed by its `constraints`
  line when non-empty, and whose reference is its `output`.
`limit` N draws a seeded random sample of N items (the study used N = 5,000), kept in file order, so
the same seed gives the same items on every model.

Scoring is the `alpaca` task's (`tasks/alpaca.py`): greedy answers with EM, token F1, ROUGE-1/L
(`scoring`), the reference's NLL per token and, against the base, JSD and top-1 agreement on the
reference tokens. With a judge (`--judge` / `--judge-url`, `evaluation/judge.py`) and a base model, the
base's and this model's answers to every item are compared pairwise in both orders: `win_rate` with its
interval, ties, position bias (see `judge`).
Sample records: the alpaca task's, plus per item `judge` (verdicts and replies in both orders) and the
metrics judge_score / judge_scored (win_rate is the judge_scored-weighted mean of judge_score).
"""
from __future__ import annotations

import random

from lmsqueeze.data import instruction_records
from lmsqueeze.evaluation.task import Headline, SampleMetric, digest, register
from lmsqueeze.evaluation.tasks.alpaca import AlpacaTask


def sample(items: list, n: int | None, seed: int) -> list:
    """A seeded random sample of n items in their original order (all of them when n is None or >= len)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n))]


@register("instruct", usage="instruct:FILE", suites=())
class InstructTask(AlpacaTask):
    """The alpaca protocol on a user's file (AlpacaTask.run), plus the judge when configured."""
    order = 41
    option_keys = ("limit", "seed", "max_new_tokens", "topk", "chat_template")
    headline = (Headline("f1", "F1", ".3f", "higher"), Headline("rougeL", "ROUGE-L", ".3f", "higher"),
                Headline("win_rate", "judge win rate", ".3f", "higher"))
    sample_metrics = {**AlpacaTask.sample_metrics, "win_rate": SampleMetric("judge_score", "judge_scored")}

    def load(self):
        from lmsqueeze.evaluation.judge import judge_from_options

        self.records = sample(instruction_records(self.arg, self.opts.data_dir), self.opts.limit, self.opts.seed)
        self.judge = judge_from_options(self.opts.extra)  # a bad judge setting fails before any model loads

    def fingerprint(self):
        return digest([[r["instruction"], r["input"], r["output"]] for r in self.records])

    def run(self, backend, base):
        out = super().run(backend, base)
        if self.judge is None:
            out["summary"]["judge"] = "none (give --judge or --judge-url)"
        elif base is None:
            out["summary"]["judge"] = "not run: the judge compares with a base model's answers (give --base)"
        else:
            from lmsqueeze.evaluation.judge import judge_answers

            verdict = judge_answers(self.judge, self.records, [i["prediction"] for i in base["items"]],
                                    [i["prediction"] for i in out["items"]], self.opts.resamples, self.opts.seed)
            out["metrics"].update(verdict.pop("metrics"))
            for item, j in zip(out["items"], verdict.pop("items")):
                item["judge"] = j
            out["summary"]["judge"] = verdict
        return out

    def samples(self, result, base, backend):
        """The alpaca records, plus per item the judge's verdicts and replies in both orders and its score
        (metrics judge_score, judge_scored: win_rate is their weighted mean)."""
        out = super().samples(result, base, backend)
        for rec, item in zip(out, result["items"]):
            if "judge" in item:
                j = item["judge"]
                rec["judge"] = {k: j[k] for k in ("identical", "verdicts", "replies")}
                rec["metrics"].update(judge_score=j["score"] if j["score"] is not None else 0.0,
                                      judge_scored=float(j["score"] is not None))
        return out
