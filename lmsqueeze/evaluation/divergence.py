"""Divergence of a (compressed) model from its base model, token by token, on the perplexity windows.

Per scored token t (the base P, the model Q, reference token y_t = the text's next token):
    kl_base_model  = KL(P||Q)        kl_model_base = KL(Q||P)        jsd = JS(P, Q) in nats (<= ln 2)
    top1           = argmax P == argmax Q
    dp_ref         = Q(y_t) - P(y_t)  (the change of the reference token's probability)
P comes from the on-disk base cache (top-k + tail; `kernels.token_divergence_topk` states the error),
so the two models never sit in memory together. Summaries: mean, median, p95, p99 of each, top-1
agreement rate and mean |dp_ref|; with the top-k cache, jsd is a lower bound and
jsd_upper_bound_mean the mean of min(jsd + (r_P + r_Q)/2 ln 2, ln 2), which brackets the true mean JSD.
"""
from __future__ import annotations

import torch

from lmsqueeze.evaluation.basecache import BaseCache
from lmsqueeze.evaluation.loglik import loglik
from lmsqueeze.kernels.divergence import LN2, token_divergence_topk

METRICS = ("kl_base_model", "kl_model_base", "jsd", "dp_ref")


def describe(values: torch.Tensor) -> dict:
    """mean, median, p95, p99 of a 1-D tensor (fp64)."""
    v = values.double()
    if v.numel() == 0:
        return {"mean": float("nan"), "median": float("nan"), "p95": float("nan"), "p99": float("nan")}
    q = torch.quantile(v, torch.tensor([0.5, 0.95, 0.99], dtype=torch.float64))
    return {"mean": v.mean().item(), "median": q[0].item(), "p95": q[1].item(), "p99": q[2].item()}


@torch.no_grad()
def token_divergences(model, requests, cache: BaseCache, batch_tokens: int = 4096, desc: str = "divergence"):
    """Per-token metrics of `model` against the cached base over `requests` (those the cache was built on).

    Returns (per-token dict of tensors [N] in cache row order, the model's loglik results).
    """
    rows = cache.rows
    n = int(rows["offsets"][-1])
    out = {m: torch.zeros(n) for m in METRICS}
    out["top1"] = torch.zeros(n, dtype=torch.bool)
    out["jsd_slack"] = torch.zeros(n)
    offsets = rows["offsets"]

    def on_rows(owner, pos, logits, targets):
        at = offsets[owner] + pos
        dev = logits.device
        d = token_divergence_topk(rows["top_logp"][at].to(dev), rows["top_idx"][at].to(dev),
                                  rows["log_tail"][at].to(dev), logits)
        lf = logits.float()
        q_ref = (lf.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(lf, dim=-1)).cpu()
        out["kl_base_model"][at] = d.kl_pq.cpu()
        out["kl_model_base"][at] = d.kl_qp.cpu()
        out["jsd"][at] = d.jsd.cpu()
        out["top1"][at] = d.top1.cpu()
        out["jsd_slack"][at] = d.jsd_slack.cpu()
        out["dp_ref"][at] = q_ref.exp() - rows["target_logp"][at].exp()

    res = loglik(model, requests, batch_tokens=batch_tokens, on_rows=on_rows, desc=desc)
    return out, res


def summarize(per_token: dict) -> dict:
    s = {m: describe(per_token[m]) for m in ("kl_base_model", "kl_model_base", "jsd")}
    s["dp_ref"] = describe(per_token["dp_ref"])
    if "jsd_slack" in per_token:  # the top-k cache makes jsd a lower bound; this is the matching upper bound
        s["jsd_upper_bound_mean"] = (per_token["jsd"] + per_token["jsd_slack"]).clamp(max=LN2).double().mean().item() \
            if per_token["jsd"].numel() else 0.0
    s["abs_dp_ref_mean"] = per_token["dp_ref"].abs().double().mean().item() if per_token["dp_ref"].numel() else 0.0
    s["top1_agreement"] = per_token["top1"].double().mean().item() if per_token["top1"].numel() else 1.0
    s["tokens"] = int(per_token["jsd"].numel())
    return s
