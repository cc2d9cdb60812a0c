"""Multiple choice: accuracy, length-normalised accuracy, flips against the base model, choice KL.

An item is (context, choices, label). Each choice is scored as the continuation " " + choice of the
context (one loglik request per choice, the context shared, so `loglik` runs it once):
    pred      = argmax_c logprob(choice_c | context)
    pred_norm = argmax_c logprob(choice_c | context) / len(UTF-8 bytes of choice_c)
    flip      = the item's correctness (pred == label) differs from the base model's
    choice_kl = KL(P_base || P_model) over the choices, P = softmax of the choices' logprobs.

Sources: PIQA (`piqa`, the labelled validation set: context "Question: <goal>\nAnswer:", the two
solutions) and any JSONL file of {"context": str, "choices": [str, ...], "label": int} lines.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lmsqueeze.errors import LmsqueezeError


@dataclass
class MCItem:
    context: str
    choices: list[str]
    label: int


def load_jsonl(path: str | Path) -> list[MCItem]:
    """Items of a {context, choices, label} JSONL file; a bad line is reported with its number."""
    path = Path(path)
    if not path.exists():
        raise LmsqueezeError(f"multiple-choice file '{path}' does not exist")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LmsqueezeError(f"{where}: not valid JSON ({exc.msg}); each line must be "
                                     f'{{"context": str, "choices": [str, ...], "label": int}}') from None
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


def _start_token(tokenizer) -> list[int]:
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if t is not None:
            return [int(t)]
    raise LmsqueezeError("an item has an empty context and the tokenizer has no BOS/EOS token to start it")


def mc_requests(tokenizer, items: list[MCItem]) -> tuple[list, list[tuple[int, int]]]:
    """Loglik requests (context ids, " " + choice ids) and, for each, (item index, choice index)."""
    reqs, where = [], []
    for i, it in enumerate(items):
        ctx = tokenizer(it.context, add_special_tokens=False)["input_ids"] if it.context else []
        if not ctx:
            ctx = _start_token(tokenizer)
        for c, choice in enumerate(it.choices):
            cont = tokenizer((" " if it.context else "") + choice, add_special_tokens=False)["input_ids"]
            if not cont:
                raise LmsqueezeError(f"item {i}: choice {c} tokenizes to nothing")
            reqs.append((ctx, cont))
            where.append((i, c))
    return reqs, where


def _per_item(items, where, logprobs):
    lps = [[0.0] * len(it.choices) for it in items]
    for (i, c), lp in zip(where, logprobs):
        lps[i][c] = lp
    return lps


def _argmax(xs):
    return max(range(len(xs)), key=lambda j: (xs[j], -j))


def _log_softmax(xs):
    m = max(xs)
    z = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - z for x in xs]


def score(items: list[MCItem], where, logprobs: list[float], base_logprobs: list[float] | None = None) -> dict:
    """Summary and per-item results from the choices' log-probabilities (and the base model's, if any)."""
    lps = _per_item(items, where, logprobs)
    blps = _per_item(items, where, base_logprobs) if base_logprobs is not None else None
    per, correct, correct_norm, flips, kls = [], 0, 0, 0, []
    for i, it in enumerate(items):
        pred = _argmax(lps[i])
        normed = [lp / max(1, len(ch.encode("utf-8"))) for lp, ch in zip(lps[i], it.choices)]
        pred_norm = _argmax(normed)
        row = {"item": i, "label": it.label, "logprobs": lps[i], "pred": pred, "pred_norm": pred_norm,
               "correct": pred == it.label, "correct_norm": pred_norm == it.label}
        correct += row["correct"]
        correct_norm += row["correct_norm"]
        if blps is not None:
            bpred = _argmax(blps[i])
            row["base_logprobs"] = blps[i]
            row["base_correct"] = bpred == it.label
            row["flip"] = row["base_correct"] != row["correct"]
            lp_b, lp_m = _log_softmax(blps[i]), _log_softmax(lps[i])
            row["choice_kl"] = max(0.0, sum(math.exp(a) * (a - b) for a, b in zip(lp_b, lp_m)))
            flips += row["flip"]
            kls.append(row["choice_kl"])
        per.append(row)
    n = len(items)
    summary = {"items": n, "acc": correct / n, "acc_norm": correct_norm / n}
    if blps is not None:
        base_acc = sum(r["base_correct"] for r in per) / n
        summary.update(base_acc=base_acc, flips=flips / n, flips_count=flips,
                       choice_kl_mean=sum(kls) / n, choice_kl_median=float(torch.tensor(kls).median()))
    return {"summary": summary, "items": per}
