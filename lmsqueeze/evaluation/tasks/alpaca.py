"""Instruction following on Alpaca (`alpaca`): greedy answers scored against the reference, and the
reference's NLL and divergence from the base.

Prompt: the user message "instruction\\n\\ninput" through the model's chat template (with the generation
prompt) when it has one, else the Alpaca template ("### Instruction: ... ### Response:") after the start
token (`Backend.instruction_prompt`). Generation: greedy, at most `max_new_tokens` new tokens, stopping
on every end-of-sequence id; prompts too long for the model are cut from the left and counted. Scored
with EM, token F1 (SQuAD normalisation), ROUGE-1 F and ROUGE-L F (`scoring`). The reference answer is
also scored as a continuation of the prompt: its NLL per token and, against the base model, the
per-token JSD and top-1 agreement on those tokens (the base's top-k rows are cached with its answers).
Intervals: Wilson for EM, bootstrap for the rest; deltas paired with the base's answers on the same items.
Sample records: prompt = the prompt text as the model got it (template included), reference = the Alpaca
answer, output / base_output = the generated answers, metrics {em, f1, rouge1, rougeL (their means are the
metrics), reference_nll, reference_jsd (per reference token; token-weighted means), reference_tokens}.
"""
from __future__ import annotations

import numpy as np

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.scoring import score_all
from lmsqueeze.evaluation.stats import estimate, mean_of, proportion
from lmsqueeze.evaluation.task import Headline, SampleMetric, Task, digest, register, sample
from lmsqueeze.evaluation.tasks import divergence

ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_TEMPLATE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                         "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                         "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
TEXT_METRICS = ("em", "f1", "rouge1", "rougeL")


def prompt_ids(backend, record: dict) -> list[int]:
    instruction, inp = record["instruction"], record.get("input") or ""
    tmpl = ALPACA_TEMPLATE_INPUT if inp else ALPACA_TEMPLATE
    return backend.instruction_prompt(instruction + (f"\n\n{inp}" if inp else ""),
                                      fallback=tmpl.format(instruction=instruction, input=inp))


def reference_requests(backend, records: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) per record; a reference longer than half the model's positions is cut to
    that length (its NLL is then over the first half-window; `cut_references` counts them)."""
    reqs, keep = [], (backend.max_len // 2 if backend.max_len else None)
    for i, r in enumerate(records):
        ref = backend.encode(r["output"])
        if not ref:
            raise LmsqueezeError(f"instruction record {i} has an empty reference output")
        reqs.append((prompt_ids(backend, r), ref[:keep] if keep else ref))
    return reqs


def _cols(items):
    cols = {k: np.array([i[k] for i in items], dtype=np.float64) for k in TEXT_METRICS}
    cols["nll"] = np.array([i["reference_nll_sum"] for i in items], dtype=np.float64)
    cols["tokens"] = np.array([i["reference_tokens"] for i in items], dtype=np.float64)
    return cols


def reference_nll(c):
    return np.sum(c["nll"], -1) / np.sum(c["tokens"], -1)


@register("alpaca", suites=("core",))
class AlpacaTask(Task):
    order = 40
    option_keys = ("limit", "max_new_tokens", "topk", "chat_template")
    headline = (Headline("em", "EM", ".3f", "higher"), Headline("f1", "F1", ".3f", "higher"),
                Headline("rougeL", "ROUGE-L", ".3f", "higher"))
    sample_metrics = {**{k: SampleMetric(k) for k in TEXT_METRICS},
                      "reference_nll": SampleMetric("reference_nll", "reference_tokens"),
                      "reference_jsd": SampleMetric("reference_jsd", "reference_tokens")}

    def load(self):
        from lmsqueeze.data import alpaca_records

        recs = alpaca_records(self.opts.data_dir)
        self.records = recs[:self.opts.limit] if self.opts.limit is not None else recs

    def fingerprint(self):
        return digest([[r["instruction"], r.get("input"), r["output"]] for r in self.records])

    def run(self, backend, base):
        reqs = reference_requests(backend, self.records)
        gen = backend.generate([c for c, _ in reqs], self.opts.max_new_tokens, desc=f"{self.name} generate")
        items = []
        for i, (r, texts) in enumerate(zip(self.records, gen.texts)):
            pred = texts[0].strip()
            items.append({"item": i, "prediction": pred, "reference": r["output"], **score_all(pred, r["output"])})
        rows = None
        if base is None:  # the base side also keeps its top-k rows on the references, for the divergence
            res, rows = divergence.base_rows(backend, reqs, self.opts.topk, f"{self.name} reference")
            per_tok = None
        else:
            per_tok, res = divergence.token_divergences(backend, reqs, base, f"{self.name} reference")
        for item, r in zip(items, res):
            item["reference_nll_sum"] = -r.logprob
            item["reference_tokens"] = r.ntokens
        cols = _cols(items)
        bcols = _cols(base["items"]) if base is not None else None
        kw = dict(resamples=self.opts.resamples, seed=self.opts.seed)
        metrics = {"em": estimate(proportion("em"), cols, bcols, **kw)}
        for k in ("f1", "rouge1", "rougeL"):
            metrics[k] = estimate(mean_of(k), cols, bcols, **kw)
        metrics["reference_nll"] = estimate(reference_nll, cols, bcols, **kw)
        summary = {k: metrics[k]["value"] for k in (*TEXT_METRICS, "reference_nll")}
        summary.update(items=len(items), max_new_tokens=self.opts.max_new_tokens, truncated_prompts=gen.truncated,
                       chat_template=backend.has_chat_template(),
                       cut_references=sum(len(backend.encode(r["output"])) > len(c) for r, (_, c) in
                                          zip(self.records, reqs)))
        if per_tok is not None:
            sums = divergence.request_sums(per_tok, reqs)
            for i, item in enumerate(items):
                item["reference_jsd_mean"] = sums["jsd"][i] / max(1, sums["tokens"][i])
            metrics.update({f"reference_{k}": v for k, v in
                            divergence.divergence_metrics(sums, self.opts.resamples, self.opts.seed).items()})
            summary["reference_divergence"] = divergence.summarize(per_tok)
        out = {"summary": summary, "metrics": metrics, "items": items}
        if rows is not None:
            out["rows"] = rows
        return out

    @staticmethod
    def item_metrics(item: dict) -> dict:
        out = {k: item[k] for k in TEXT_METRICS}
        out.update(reference_nll=item["reference_nll_sum"] / item["reference_tokens"],
                   reference_tokens=item["reference_tokens"])
        if "reference_jsd_mean" in item:
            out["reference_jsd"] = item["reference_jsd_mean"]
        return out

    def samples(self, result, base, backend):
        base_items = base["items"] if base is not None else None
        return [sample(i, prompt=backend.tokenizer.decode(prompt_ids(backend, r)), reference=r["output"],
                       output=it["prediction"], base_output=base_items[i]["prediction"] if base_items else None,
                       metrics=self.item_metrics(it),
                       base_metrics=self.item_metrics(base_items[i]) if base_items else None)
                for i, (r, it) in enumerate(zip(self.records, result["items"]))]
