"""The built-in tasks: perplexity, divergence from the base, multiple choice (PIQA, JSONL), Alpaca."""
from __future__ import annotations

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation import divergence, instruct, multiple_choice
from lmsqueeze.evaluation.loglik import loglik
from lmsqueeze.evaluation.perplexity import source_windows, summarize_ppl, text_units, window_requests
from lmsqueeze.evaluation.tasks import Task, register


class PerplexityTask(Task):
    kind = "ppl"

    def build_requests(self, tokenizer):
        self._windows = source_windows(tokenizer, self.arg, self.opts.seqlen, self.opts.limit, self.opts.data_dir)
        return window_requests(self._windows)

    def run(self, model, tokenizer, base_cache):
        reqs = self.requests(tokenizer)
        res = loglik(model, reqs, batch_tokens=self.opts.batch_tokens, shared_context=False, desc=self.name)
        words, nbytes = text_units(tokenizer, self._windows)
        summary = summarize_ppl([-r.logprob for r in res], [r.ntokens for r in res], words, nbytes)
        summary.update(windows=len(reqs), seqlen=self.opts.seqlen)
        items = [{"window": i, "nll": -r.logprob, "tokens": r.ntokens} for i, r in enumerate(res)]
        return {"summary": summary, "items": items}


class DivergenceTask(PerplexityTask):
    kind = "divergence"
    uses_base = True
    needs_base = True

    @property
    def base_topk(self):
        return self.opts.topk

    def run(self, model, tokenizer, base_cache):
        reqs = self.requests(tokenizer)
        per_tok, res = divergence.token_divergences(model, reqs, base_cache, self.opts.batch_tokens, desc=self.name)
        summary = divergence.summarize(per_tok)
        summary.update(windows=len(reqs), seqlen=self.opts.seqlen, topk=self.opts.topk,
                       note="base coarse-grained to its top-k tokens + tail: divergences are lower bounds")
        off = base_cache.rows["offsets"]
        items = []
        for i, r in enumerate(res):
            sl = slice(int(off[i]), int(off[i + 1]))
            items.append({"window": i, "tokens": r.ntokens, "nll": -r.logprob,
                          "base_nll": -base_cache.items[i]["logprob"],
                          **{m: per_tok[m][sl].tolist() for m in divergence.METRICS},
                          "top1": per_tok["top1"][sl].tolist()})
        return {"summary": summary, "items": items}


class MultipleChoiceTask(Task):
    uses_base = True

    def load_items(self) -> list:
        raise NotImplementedError

    def build_requests(self, tokenizer):
        items = self.load_items()
        if self.opts.limit is not None:
            items = items[:self.opts.limit]
        self._items = items
        reqs, self._where = multiple_choice.mc_requests(tokenizer, items)
        return reqs

    def run(self, model, tokenizer, base_cache):
        reqs = self.requests(tokenizer)
        res = loglik(model, reqs, batch_tokens=self.opts.batch_tokens, desc=self.name)
        base_lps = [it["logprob"] for it in base_cache.items] if base_cache is not None else None
        return multiple_choice.score(self._items, self._where, [r.logprob for r in res], base_lps)


class PiqaTask(MultipleChoiceTask):
    kind = "piqa"

    def load_items(self):
        return multiple_choice.piqa_items(self.opts.data_dir)


class JsonlTask(MultipleChoiceTask):
    kind = "mc"

    def load_items(self):
        if not self.arg.endswith(".jsonl"):
            raise LmsqueezeError(f"task 'mc:{self.arg}': expected a .jsonl file of "
                                 f'{{"context", "choices", "label"}} lines')
        return multiple_choice.load_jsonl(self.arg)


class AlpacaTask(Task):
    kind = "alpaca"
    uses_base = True

    @property
    def base_topk(self):
        return self.opts.topk

    def build_requests(self, tokenizer):
        from lmsqueeze.data import alpaca_records

        recs = alpaca_records(self.opts.data_dir)
        self._records = recs[:self.opts.limit] if self.opts.limit is not None else recs
        return instruct.reference_requests(tokenizer, self._records)

    def run(self, model, tokenizer, base_cache):
        reqs = self.requests(tokenizer)
        gens = instruct.generate_greedy(model, tokenizer, [c for c, _ in reqs], self.opts.max_new_tokens,
                                        self.opts.batch_tokens)
        out = instruct.score_generations(self._records, gens)
        if base_cache is not None:
            per_tok, res = divergence.token_divergences(model, reqs, base_cache, self.opts.batch_tokens,
                                                        desc=f"{self.name} reference")
            out["summary"]["reference_divergence"] = divergence.summarize(per_tok)
            off = base_cache.rows["offsets"]
            for i, item in enumerate(out["items"]):
                item["reference_jsd_mean"] = per_tok["jsd"][int(off[i]):int(off[i + 1])].double().mean().item()
        else:
            res = loglik(model, reqs, batch_tokens=self.opts.batch_tokens, desc=f"{self.name} reference")
        tokens = sum(r.ntokens for r in res)
        out["summary"]["reference_nll"] = -sum(r.logprob for r in res) / tokens
        out["summary"]["max_new_tokens"] = self.opts.max_new_tokens
        for item, r in zip(out["items"], res):
            item["reference_nll"] = -r.logprob / r.ntokens
        return out


register("ppl", PerplexityTask, "ppl:SOURCE")
register("divergence", DivergenceTask, "divergence:SOURCE")
register("piqa", PiqaTask, "piqa")
register("mc", JsonlTask, "mc:PATH.jsonl")
register("alpaca", AlpacaTask, "alpaca")
