"""Divergence of a (compressed) model from its base model, token by token, on perplexity windows
(`divergence:SOURCE`; the same windows as `ppl:SOURCE`).

Per scored token t (the base P, the model Q, reference token y_t = the text's next token):
    kl_base_model  = KL(P||Q)        kl_model_base = KL(Q||P)        jsd = JS(P, Q) in nats (<= ln 2)
    top1           = argmax P == argmax Q
    dp_ref         = Q(y_t) - P(y_t)  (the change of the reference token's probability)
P comes from the base run, cached on disk as its top-k log-probs + tail mass per token
(`kernels.token_divergence_topk` states the error), so the two models never sit in memory together.
Summaries: mean, median, p95, p99 of each, top-1 agreement and mean |dp_ref|; with the top-k cache jsd
is a lower bound and jsd_upper_bound_mean the mean of min(jsd + (r_P + r_Q)/2 ln 2, ln 2), which
brackets the true mean JSD. Intervals: percentile bootstrap over windows (token-weighted means).
Sample records: one per window (as `ppl`), metrics {jsd, kl, top1: per-token means over the window, nll,
tokens}; jsd, kl and top1 are the token-weighted means of them.
"""
from __future__ import annotations

import numpy as np
import torch

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.evaluation.stats import estimate
from lmsqueeze.evaluation.task import Headline, SampleMetric, register
from lmsqueeze.evaluation.tasks.perplexity import PerplexityTask
from lmsqueeze.kernels.divergence import LN2, token_divergence_topk, topk_summary

METRICS = ("kl_base_model", "kl_model_base", "jsd", "dp_ref")


def describe(values: torch.Tensor) -> dict:
    """mean, median, p95, p99 of a 1-D tensor (fp64)."""
    v = values.double()
    if v.numel() == 0:
        return {"mean": float("nan"), "median": float("nan"), "p95": float("nan"), "p99": float("nan")}
    q = torch.quantile(v, torch.tensor([0.5, 0.95, 0.99], dtype=torch.float64))
    return {"mean": v.mean().item(), "median": q[0].item(), "p95": q[1].item(), "p99": q[2].item()}


def base_rows(backend, requests, k: int, desc: str):
    """(loglik results, rows): the base's top-k log-probs, their ids, the tail mass and the reference
    token's log-prob for every scored token."""
    def rows(owner, pos, logits, targets):
        top, idx, tail = topk_summary(logits, k)
        lf = logits.float()
        tl = lf.gather(1, targets[:, None].to(lf.device)).squeeze(1) - torch.logsumexp(lf, dim=-1)
        return {"top_logp": top.float().cpu(), "top_idx": idx.to(torch.int32).cpu(), "log_tail": tail.float().cpu(),
                "target_logp": tl.cpu()}
    return backend.token_rows(requests, rows, desc=desc)


def token_divergences(backend, requests, base: dict, desc: str):
    """(per-token dict of tensors [N] in request order, the model's loglik results) against base rows."""
    rows = base["rows"]
    lens = torch.tensor([len(x) for _, x in requests], dtype=torch.long)
    offsets = torch.zeros(len(requests) + 1, dtype=torch.long)
    offsets[1:] = lens.cumsum(0)
    if int(offsets[-1]) != rows["top_logp"].shape[0]:
        raise LmsqueezeError(f"{desc}: the base cache holds {rows['top_logp'].shape[0]} token rows but the requests "
                             f"have {int(offsets[-1])}; rebuild it (--no-cache)")

    def div(owner, pos, logits, targets):
        at = offsets[owner] + pos
        dev = logits.device
        d = token_divergence_topk(rows["top_logp"][at].to(dev), rows["top_idx"][at].to(dev),
                                  rows["log_tail"][at].to(dev), logits)
        lf = logits.float()
        q_ref = (lf.gather(1, targets[:, None].to(dev)).squeeze(1) - torch.logsumexp(lf, dim=-1)).cpu()
        return {"kl_base_model": d.kl_pq.cpu(), "kl_model_base": d.kl_qp.cpu(), "jsd": d.jsd.cpu(),
                "top1": d.top1.cpu(), "jsd_slack": d.jsd_slack.cpu(),
                "dp_ref": q_ref.exp() - rows["target_logp"][at].exp()}

    res, per_tok = backend.token_rows(requests, div, desc=desc)
    return per_tok, res


def summarize(per_token: dict) -> dict:
    s = {m: describe(per_token[m]) for m in METRICS}
    n = per_token["jsd"].numel()
    s["jsd_upper_bound_mean"] = (per_token["jsd"] + per_token["jsd_slack"]).clamp(max=LN2).double().mean().item() \
        if n else 0.0
    s["abs_dp_ref_mean"] = per_token["dp_ref"].abs().double().mean().item() if n else 0.0
    s["top1_agreement"] = per_token["top1"].double().mean().item() if n else 1.0
    s["tokens"] = int(n)
    return s


def request_sums(per_token: dict, requests) -> dict:
    """Per request: the sums of jsd, kl_base_model, top1 over its tokens, and its token count."""
    out = {m: [] for m in ("jsd", "kl_base_model", "top1")}
    out["tokens"] = []
    at = 0
    for _, cont in requests:
        sl = slice(at, at + len(cont))
        for m in ("jsd", "kl_base_model", "top1"):
            out[m].append(float(per_token[m][sl].double().sum()))
        out["tokens"].append(len(cont))
        at += len(cont)
    return out


def divergence_metrics(sums: dict, resamples: int, seed: int) -> dict:
    """jsd, kl and top-1 agreement as token-weighted means with intervals bootstrapped over requests."""
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in sums.items()}

    def ratio(name):
        return lambda c: np.sum(c[name], -1) / np.sum(c["tokens"], -1)

    return {"jsd": estimate(ratio("jsd"), cols, resamples=resamples, seed=seed),
            "top1": estimate(ratio("top1"), cols, resamples=resamples, seed=seed),
            "kl": estimate(ratio("kl_base_model"), cols, resamples=resamples, seed=seed)}


@register("divergence", usage="divergence:SOURCE", suites=("core",), suite_needs_base=True)
class DivergenceTask(PerplexityTask):
    order = 20
    suite_arg = "divergence:wikitext2:test"
    needs_base = True
    option_keys = ("limit", "seqlen", "topk")
    headline = (Headline("jsd", "JSD", ".4f", "lower"), Headline("top1", "top-1 agr.", ".3f", "higher"))
    sample_metrics = {"jsd": SampleMetric("jsd", "tokens"), "kl": SampleMetric("kl", "tokens"),
                      "top1": SampleMetric("top1", "tokens")}

    def window_metrics(self, item: dict) -> dict:
        out = super().window_metrics(item)
        if "jsd_sum" in item:  # the model side; the base side holds only its NLL
            n = item["tokens"]
            out.update(jsd=item["jsd_sum"] / n, kl=item["kl_sum"] / n, top1=item["top1_count"] / n)
        return out

    def run(self, backend, base):
        reqs = self.requests(backend.tokenizer)
        if base is None:  # the base side: its top-k distribution per token, for the cache
            res, rows = base_rows(backend, reqs, self.opts.topk, f"base {self.name}")
            items = [{"window": i, "tokens": r.ntokens, "nll": -r.logprob} for i, r in enumerate(res)]
            return {"summary": {"windows": len(reqs), "topk": self.opts.topk}, "metrics": {}, "items": items,
                    "rows": rows}
        per_tok, res = token_divergences(backend, reqs, base, self.name)
        summary = summarize(per_tok)
        summary.update(windows=len(reqs), seqlen=self.opts.seqlen, topk=self.opts.topk,
                       note="base coarse-grained to its top-k tokens + tail: divergences are lower bounds")
        sums = request_sums(per_tok, reqs)
        items = [{"window": i, "tokens": r.ntokens, "nll": -r.logprob, "base_nll": base["items"][i]["nll"],
                  "jsd_sum": sums["jsd"][i], "kl_sum": sums["kl_base_model"][i], "top1_count": sums["top1"][i]}
                 for i, r in enumerate(res)]
        return {"summary": summary, "metrics": divergence_metrics(sums, self.opts.resamples, self.opts.seed),
                "items": items}
