"""Evaluation throughput: the batched loglik core against the straightforward way, validated first.

    python bench/bench_eval.py [--model smollm2-135m] [--dtype bf16] [--piqa-items 200] [--windows 8] [--quick]

Cases (each validated against its baseline before timing; one call = the whole task):
- ppl: token-weighted perplexity over `--windows` windows of `--seqlen` tokens of wikitext2:test.
  baseline: one forward per window with `labels=` (Hugging Face's own loss), the full logits.
- divergence: per-token KL/JSD/top-1 of the model against its base on the same windows.
  baseline: both models forward per window, full log-softmax of both, torch.nn.functional.kl_div;
  ours: the model alone against the base's on-disk top-k cache (built once, untimed, reported apart).
  The model is the base itself here (the throughput does not depend on the weights); validation
  checks both give zero divergence and agree on perplexity.
- piqa: accuracy on the first `--piqa-items` PIQA items.
  baseline: one forward per (context, choice) pair, full logits and log-softmax over the sequence,
  as lm-eval-harness does; ours: `loglik` batched (full sequences; the shared-context KV-cache path
  is off by default, see loglik). Validation: identical predictions, hence identical accuracy.
The table gives tokens/s (ppl, divergence) or items/s (piqa) and the speedup over the baseline.
"""
from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.harness import Case, parser, run  # noqa: E402
from lmsqueeze import models  # noqa: E402
from lmsqueeze.evaluation import basecache, divergence  # noqa: E402
from lmsqueeze.evaluation.loglik import loglik  # noqa: E402
from lmsqueeze.evaluation.multiple_choice import mc_requests, piqa_items, score  # noqa: E402
from lmsqueeze.evaluation.perplexity import source_windows, window_requests  # noqa: E402


# ---- baselines: the straightforward way ----------------------------------------------------------------

@torch.no_grad()
def ppl_per_window(model, wins):
    nll, n = 0.0, 0
    for w in wins:
        ids = w[None]
        loss = model(input_ids=ids, labels=ids).loss.item()
        nll += loss * (w.numel() - 1)
        n += w.numel() - 1
    return math.exp(nll / n)


@torch.no_grad()
def divergence_both_models(base, model, wins):
    jsd, kl, n = 0.0, 0.0, 0
    F = torch.nn.functional
    for w in wins:
        ids = w[None, :-1]
        lp = torch.log_softmax(base(input_ids=ids).logits[0].float(), -1)
        lq = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        kl += F.kl_div(lq, lp, log_target=True, reduction="sum").item()
        lm = torch.logaddexp(lp, lq) - math.log(2)
        jsd += 0.5 * (F.kl_div(lm, lp, log_target=True, reduction="sum").item()
                      + F.kl_div(lm, lq, log_target=True, reduction="sum").item())
        n += ids.shape[1]
    return {"kl": kl / n, "jsd": jsd / n}


@torch.no_grad()
def mc_per_pair(model, reqs):
    """lm-eval-harness style: one forward per (context, continuation), log-softmax of all positions."""
    out = []
    for ctx, cont in reqs:
        ids = torch.tensor([ctx + cont])[:, :-1]
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont))
        out.append(lp[pos, torch.tensor(cont)].sum().item())
    return out


# ---- cases ----------------------------------------------------------------------------------------------

def cases(args) -> tuple[list[Case], dict]:
    groups = set(args.groups.split(","))
    model, tok = models.load_model(args.model, dtype=args.dtype)
    threads = torch.get_num_threads()
    wins = source_windows(tok, "wikitext2:test", args.seqlen, args.windows)
    reqs = window_requests(wins)
    ntok = sum(len(c) for _, c in reqs)
    common = {"model": args.model, "dtype": args.dtype, "threads": threads}
    work = {}
    out = []

    ppl_params = {**common, "windows": len(wins), "seqlen": args.seqlen, "tokens": ntok}
    work["ppl"] = ntok
    if "ppl" in groups:
        out += ppl_cases(model, wins, reqs, ppl_params, args)
    if "divergence" in groups:
        out += divergence_cases(model, wins, reqs, {**ppl_params, "topk": args.topk}, args, work)
    if "piqa" in groups:
        out += piqa_cases(model, tok, common, args, work)
    return out, work


def ppl_cases(model, wins, reqs, ppl_params, args):
    out = []

    def ours_ppl():
        res = loglik(model, reqs, batch_tokens=args.batch_tokens, shared_context=False)
        return math.exp(-sum(r.logprob for r in res) / sum(r.ntokens for r in res))

    ref_ppl = ppl_per_window(model, wins)

    def check_ppl(v):
        return None if abs(v / ref_ppl - 1) < 1e-2 else f"ppl {v:.4f} vs baseline {ref_ppl:.4f}"

    out.append(Case("baseline: HF loss, 1 window/forward", "ppl", lambda: ppl_per_window(model, wins), ppl_params,
                    check=check_ppl))
    out.append(Case("ours: loglik, batched", "ppl", ours_ppl, ppl_params, check=check_ppl,
                    baseline="baseline: HF loss, 1 window/forward"))

    return out


def divergence_cases(model, wins, reqs, div_params, args, work):
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))

    t0 = time.perf_counter()
    cache = basecache.build_cache(model, reqs, tmp / "cache", args.topk, {"bench": True},
                                  batch_tokens=args.batch_tokens)
    work["base_cache_s"] = time.perf_counter() - t0

    def ours_div():
        per, _ = divergence.token_divergences(model, reqs, cache, args.batch_tokens)
        return divergence.summarize(per)

    def check_div(v):
        jsd = v["jsd"]["mean"] if "jsd" in v and isinstance(v["jsd"], dict) else v["jsd"]
        return None if abs(jsd) < 2e-3 else f"divergence of a model from itself is {jsd}"

    out.append(Case("baseline: both models, full log-softmax", "divergence",
                    lambda: divergence_both_models(model, model, wins), div_params, check=check_div))
    out.append(Case("ours: model vs top-k base cache", "divergence", ours_div, div_params, check=check_div,
                    baseline="baseline: both models, full log-softmax"))

    return out


def piqa_cases(model, tok, common, args, work):
    out = []
    items = piqa_items()[:args.piqa_items]
    mreqs, where = mc_requests(tok, items)
    work["piqa"] = len(items)
    mc_params = {**common, "items": len(items), "pairs": len(mreqs), "tokens": sum(len(c) + len(x) for c, x in mreqs)}
    base_lps = mc_per_pair(model, mreqs)
    base_pred = [r["pred"] for r in score(items, where, base_lps)["items"]]
    work["piqa_acc_baseline"] = score(items, where, base_lps)["summary"]["acc"]

    def check_mc(lps):
        s = score(items, where, lps)
        preds = [r["pred"] for r in s["items"]]
        diff = sum(a != b for a, b in zip(preds, base_pred))
        return None if diff == 0 else f"{diff} predictions differ from one-forward-per-pair"

    out.append(Case("baseline: 1 forward per (context, choice)", "piqa", lambda: mc_per_pair(model, mreqs), mc_params,
                    check=check_mc))
    out.append(Case("ours: loglik, batched", "piqa",
                    lambda: [r.logprob for r in loglik(model, mreqs, batch_tokens=args.batch_tokens)],
                    mc_params, check=check_mc, baseline="baseline: 1 forward per (context, choice)"))
    return out


def rates(results: list[dict], work: dict) -> str:
    lines = ["| group | case | throughput | speedup |", "|---|---|---|---|"]
    by = {(r["group"], r["name"]): r for r in results}
    for r in results:
        if "median_s" not in r:
            continue
        if r["group"] == "piqa":
            rate = f"{work['piqa'] / r['median_s']:.2f} items/s"
        else:
            rate = f"{work['ppl'] / r['median_s']:.0f} tokens/s"
        base = by.get((r["group"], r.get("baseline")))
        sp = f"{base['median_s'] / r['median_s']:.2f}x" if base and "median_s" in base else ""
        lines.append(f"| {r['group']} | {r['name']} | {rate} | {sp} |")
    return "\n".join(lines)


def main():
    p = parser(__doc__)
    p.set_defaults(warmup=0, repeat=2, min_seconds=0.0)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--piqa-items", type=int, default=200)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--groups", default="ppl,divergence,piqa", help="comma-separated subset of ppl,divergence,piqa")
    args = p.parse_args()
    if args.quick:
        args.windows, args.piqa_items, args.seqlen = 2, 20, 128
    cs, work = cases(args)
    results = run("eval", cs, args)
    print(rates(results, work))
    if "base_cache_s" in work:
        print(f"\nbase cache for divergence built once in {work['base_cache_s']:.2f} s (untimed above)")
    if "piqa_acc_baseline" in work:
        print(f"PIQA accuracy (validated: identical predictions in every case): {work['piqa_acc_baseline']:.4f}")


if __name__ == "__main__":
    main()
